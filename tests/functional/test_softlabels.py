"""Tests of `kdfast.SoftLabels` and `kdfast.compress_topk` against the float64 oracle.

`kdfast.reference.compress_topk` selects by a stable descending sort of the raw logits and
normalises in float64; the fused kernel must pick exactly the same indices (ties: lower
index first; −inf entries last, in index order) and match the log-probabilities and the
tail log-mass to float32 accuracy, including tails far below the float32 range of
probabilities. The container's checks, conversions and storage sizes are tested too.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from cpu_variants import other_cpu_variants, run_on_cpu_variant
from kdfast import reference
from kdfast.ops import sparse as sparse_ops
from kdfast.softlabels import SoftLabels, smallest_index_dtype

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def random_logits(shape, *, seed: int, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * scale).to(dtype)


def assert_matches_reference(teacher: torch.Tensor, k: int, temperature: float = 1.0, **kwargs) -> SoftLabels:
    """compress_topk vs the oracle: identical indices, fp32-close log-probabilities and tail."""
    actual = kdfast.compress_topk(teacher, k, temperature=temperature, **kwargs)
    expected = reference.compress_topk(teacher.to(torch.float64), k, temperature=temperature, index_dtype=torch.int64)
    assert actual.indices.shape == teacher.shape[:-1] + (k,)
    assert actual.tail_logprob.shape == teacher.shape[:-1]
    assert actual.vocab_size == teacher.shape[-1] and actual.temperature == temperature
    value_dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    assert actual.logprobs.dtype == value_dtype and actual.tail_logprob.dtype == value_dtype
    assert torch.equal(actual.indices.to(torch.int64), expected.indices)
    tolerance = 1e-12 if teacher.dtype == torch.float64 else 2e-6
    for got, want in ((actual.logprobs, expected.logprobs), (actual.tail_logprob, expected.tail_logprob)):
        got64 = got.to(torch.float64)
        assert torch.equal(torch.isneginf(got64), torch.isneginf(want)), "−inf pattern differs"
        finite = torch.isfinite(want)
        error = (got64[finite] - want[finite]).abs()
        bound = tolerance * (1.0 + want[finite].abs())
        assert bool((error <= bound).all()), f"max error {error.max().item():.3g}"
    return actual


# ------------------------------------------------------------------------ compress_topk


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=lambda dtype: DTYPE_IDS[dtype])
@pytest.mark.parametrize(
    "leading_shape, vocab_size, k",
    [((5,), 1, 1), ((3, 4), 7, 3), ((6,), 1271, 1), ((6,), 1271, 40), ((2, 3), 4099, 257), ((2,), 50257, 64)],
)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_compress_matches_reference(dtype, leading_shape, vocab_size, k, temperature):
    teacher = random_logits(leading_shape + (vocab_size,), seed=vocab_size + k, dtype=dtype)
    soft_labels = assert_matches_reference(teacher, k, temperature)
    soft_labels.validate()


@pytest.mark.parametrize("vocab_size", [7, 300, 2500])
def test_k_equal_to_vocab_keeps_everything(vocab_size):
    teacher = random_logits((4, vocab_size), seed=1)
    soft_labels = assert_matches_reference(teacher, vocab_size, 2.0)
    assert torch.isneginf(soft_labels.tail_logprob).all()
    expected = torch.log_softmax(teacher.double() / 2.0, -1).sort(-1, descending=True).values
    torch.testing.assert_close(soft_labels.logprobs.double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("value_range", [2, 5])
@pytest.mark.parametrize("vocab_size, k", [(50, 10), (5000, 64), (5000, 1000)])
def test_ties_keep_lower_index_first(vocab_size, k, value_range):
    generator = torch.Generator().manual_seed(vocab_size + value_range)
    teacher = torch.randint(0, value_range, (4, vocab_size), generator=generator).float()
    soft_labels = assert_matches_reference(teacher, k)
    indices = soft_labels.indices.long()
    values = teacher.gather(-1, indices)
    same_value = values[:, 1:] == values[:, :-1]
    assert bool((indices[:, 1:][same_value] > indices[:, :-1][same_value]).all())


@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("k", [1, 16, 300])
def test_sorted_rows(order, k):
    teacher = random_logits((3, 9000), seed=k).sort(-1, descending=order == "descending").values
    assert_matches_reference(teacher, k)


@pytest.mark.parametrize("variant", other_cpu_variants())
def test_selection_on_other_cpu_variants(variant):
    """The selection's vector paths differ per variant (AVX-512: vcompress; AVX2: a permute
    table; baseline: scalar): ties, random rows with many cuts, and sorted rows on each."""
    run_on_cpu_variant(variant, (
        "import torch\n"
        "from test_softlabels import assert_matches_reference, random_logits\n"
        "g = torch.Generator().manual_seed(7)\n"
        "for k in (16, 64, 1000):\n"
        "    assert_matches_reference(torch.randint(0, 3, (4, 5000), generator=g).float(), k)\n"
        "    assert_matches_reference(random_logits((3, 50257), seed=k), k, 2.0)\n"
        "    assert_matches_reference(random_logits((2, 9000), seed=k).sort(-1).values, k)\n"
        "assert_matches_reference(random_logits((2, 20000), seed=3, dtype=torch.bfloat16), 64)\n"
    ))


def test_masked_vocabulary_entries():
    teacher = random_logits((4, 600), seed=2)
    teacher[:, ::3] = -math.inf
    teacher[1, 5:] = -math.inf  # row 1 keeps only indices 1, 2 and 4 finite: fewer than k
    soft_labels = assert_matches_reference(teacher, 8)
    finite_in_row_1 = int(torch.isfinite(teacher[1]).sum())
    assert torch.isneginf(soft_labels.logprobs[1, finite_in_row_1:]).all()
    masked_indices = soft_labels.indices[1, finite_in_row_1:].long()
    assert bool((masked_indices[1:] > masked_indices[:-1]).all()), "masked entries come in index order"
    assert torch.isneginf(soft_labels.tail_logprob[1])
    assert torch.isfinite(soft_labels.tail_logprob[0])


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("gap", [40.0, 80.0, 200.0])
def test_tiny_tail_is_exact(k, gap):
    # k logits at 0 and the rest `gap` below: the tail is (V−k)·e^−gap / (k + (V−k)·e^−gap),
    # down to ~1e-83, far below anything 1 − Σ kept could resolve (or float32 could hold).
    vocab_size = 10_000
    teacher = torch.full((3, vocab_size), -gap)
    teacher[:, [17, 4321, 9000, 9999][:k]] = 0.0
    teacher[1] += 1e4  # a large common offset changes nothing
    soft_labels = kdfast.compress_topk(teacher, k)
    others = vocab_size - k
    expected_tail = math.log(others) - gap - math.log(k + others * math.exp(-gap))
    torch.testing.assert_close(
        soft_labels.tail_logprob.double(), torch.full((3,), expected_tail, dtype=torch.float64), rtol=1e-6, atol=0
    )
    expected_kept = -math.log(k + others * math.exp(-gap))
    torch.testing.assert_close(
        soft_labels.logprobs.double(), torch.full((3, k), expected_kept, dtype=torch.float64), rtol=0, atol=2e-6
    )


def test_tail_exact_when_dominated_by_few_entries():
    # One tail entry far above the rest: the running tail maximum changes mid-row.
    teacher = torch.full((2, 20_000), -300.0)
    teacher[:, 3] = 10.0
    teacher[:, 15_000] = -50.0
    soft_labels = kdfast.compress_topk(teacher, 1)
    expected = torch.logsumexp(torch.tensor([-50.0] + [-300.0] * 19_998, dtype=torch.float64), 0) - torch.logsumexp(
        torch.tensor([10.0, -50.0] + [-300.0] * 19_998, dtype=torch.float64), 0
    )
    torch.testing.assert_close(soft_labels.tail_logprob.double(), expected.expand(2), rtol=1e-6, atol=0)


def test_large_logits():
    teacher = random_logits((4, 3000), seed=5, scale=1.0) + torch.tensor([1e4, -1e4, 0.0, 5e3])[:, None]
    assert_matches_reference(teacher, 20, 1.0)
    assert_matches_reference(teacher, 20, 0.25)


def test_nan_and_fully_masked_rows_give_nan():
    teacher = random_logits((3, 5000), seed=6)
    teacher[0, 4000] = math.nan
    teacher[1] = -math.inf
    soft_labels = kdfast.compress_topk(teacher, 5)
    assert torch.isnan(soft_labels.logprobs[0]).all() and torch.isnan(soft_labels.tail_logprob[0])
    assert torch.isnan(soft_labels.logprobs[1]).all()
    assert torch.isfinite(soft_labels.logprobs[2]).all()


@pytest.mark.parametrize("dtype, temperature, vocab_size",
                         [(torch.float32, 1.0, 123_457), (torch.float32, 2.0, 123_457), (torch.bfloat16, 1.0, 123_457),
                          (torch.float16, 2.0, 123_457), (torch.float32, 1.0, 300_007)],
                         ids=["fp32-T1", "fp32-T2", "bf16-T1", "fp16-T2", "fp32-T1-rows-over-1MiB"])
def test_large_call_prefetching_as_it_goes_equals_small_calls(dtype, temperature, vocab_size):
    # Above 64 MiB of logits the vector splits ask for lines ahead as they go: rows up to 1 MiB
    # for the next row, in several streams (past the call's last row too), longer rows one chunk
    # ahead in their own row; 16-bit logits are read straight from the row. An odd V puts most
    # rows off a 64-byte boundary and leaves a masked remainder; rows with NaN, masked entries,
    # ascending and tiny-tail content ride along (16-bit logits also tie often).
    k = 64
    element_size = torch.tensor([], dtype=dtype).element_size()
    rows = 10 * math.ceil(70 * 2**20 / (vocab_size * element_size) / 10)  # a multiple of 10, over 64 MiB in all
    teacher = random_logits((rows, vocab_size), seed=11, dtype=dtype)
    teacher[3, 70_000] = math.nan
    teacher[5, ::3] = -math.inf
    teacher[7] = teacher[7].sort().values
    teacher[9] = -90.0
    teacher[9, [4, 99_999]] = 0.0
    assert teacher.numel() * teacher.element_size() > 64 * 2**20
    whole = kdfast.compress_topk(teacher, k, temperature=temperature)
    parts = [kdfast.compress_topk(teacher[i:i + 10], k, temperature=temperature) for i in range(0, rows, 10)]
    assert torch.equal(whole.indices, torch.cat([part.indices for part in parts]))
    for name in ("logprobs", "tail_logprob"):
        got, want = getattr(whole, name), torch.cat([getattr(part, name) for part in parts])
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), name
    assert torch.isnan(whole.tail_logprob[3]) and not torch.isnan(whole.tail_logprob[[2, 4, 5, 7, 9]]).any()
    for row in (0, 5, 7, 9, rows - 1):
        assert_matches_reference(teacher[row:row + 1], k, temperature)


def test_non_contiguous_input_and_thread_count():
    base = random_logits((3000, 8), seed=7)
    teacher = base.t()  # [8, 3000] with a non-unit vocabulary stride
    expected = kdfast.compress_topk(teacher.contiguous(), 33)
    actual = kdfast.compress_topk(teacher, 33)
    assert torch.equal(actual.indices, expected.indices) and torch.equal(actual.logprobs, expected.logprobs)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = kdfast.compress_topk(random_logits((64, 4096), seed=8), 16)
        torch.set_num_threads(2)
        double = kdfast.compress_topk(random_logits((64, 4096), seed=8), 16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single.indices, double.indices) and torch.equal(single.logprobs, double.logprobs)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32, torch.int16, torch.uint16])
def test_index_dtypes(index_dtype):
    teacher = random_logits((4, 30_000), seed=9)
    soft_labels = kdfast.compress_topk(teacher, 12, index_dtype=index_dtype)
    assert soft_labels.indices.dtype == index_dtype
    expected = kdfast.compress_topk(teacher, 12, index_dtype=torch.int64)
    assert torch.equal(soft_labels.indices.to(torch.int32).to(torch.int64), expected.indices)


def test_teacher_gradient_is_not_tracked():
    teacher = random_logits((2, 100), seed=10).requires_grad_(True)
    soft_labels = kdfast.compress_topk(teacher, 4)
    assert not soft_labels.logprobs.requires_grad and not soft_labels.tail_logprob.requires_grad


@pytest.mark.parametrize("k", [0, -1, 8])
def test_bad_k(k):
    with pytest.raises(ValueError, match=rf"k={k}.*V=7"):
        kdfast.compress_topk(random_logits((2, 7), seed=0), k)
    with pytest.raises(ValueError, match=rf"k={k}.*V=7"):
        reference.compress_topk(random_logits((2, 7), seed=0), k)


def test_bad_arguments():
    teacher = random_logits((2, 7), seed=0)
    for temperature in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            kdfast.compress_topk(teacher, 2, temperature=temperature)
    with pytest.raises(TypeError, match="k must be an int"):
        kdfast.compress_topk(teacher, 2.0)
    with pytest.raises(TypeError, match="floating"):
        kdfast.compress_topk(torch.ones(2, 7, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="0-dim"):
        kdfast.compress_topk(torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match="int16 cannot hold"):
        kdfast.compress_topk(random_logits((1, 40_000), seed=0), 2, index_dtype=torch.int16)
    with pytest.raises(TypeError, match="index_dtype"):
        kdfast.compress_topk(teacher, 2, index_dtype=torch.float32)


def test_opcheck_topk_compress():
    teacher = random_logits((5, 300), seed=11)
    for logits, index_dtype, temperature in ((teacher, torch.int32, 1.5), (teacher.bfloat16(), torch.int64, 1.0)):
        outputs = (torch.empty(5, 7, dtype=index_dtype), torch.empty(5, 7), torch.empty(5))
        torch.library.opcheck(sparse_ops.topk_compress, (logits, *outputs, temperature))


# ------------------------------------------------------------------------ SoftLabels


def make_soft_labels(rows=4, vocab_size=1000, k=8, seed=0) -> SoftLabels:
    return kdfast.compress_topk(random_logits((rows, vocab_size), seed=seed), k, temperature=2.0)


def test_construction_checks_shapes_and_dtypes():
    good = make_soft_labels()
    fields = dict(indices=good.indices, logprobs=good.logprobs, tail_logprob=good.tail_logprob, temperature=2.0,
                  vocab_size=1000)
    SoftLabels(**fields)
    with pytest.raises(ValueError, match="logprobs shape"):
        SoftLabels(**{**fields, "logprobs": good.logprobs[:, :3]})
    with pytest.raises(ValueError, match="tail_logprob shape"):
        SoftLabels(**{**fields, "tail_logprob": good.tail_logprob[:2]})
    with pytest.raises(ValueError, match="k=8, V=5"):
        SoftLabels(**{**fields, "vocab_size": 5})
    with pytest.raises(ValueError, match="temperature"):
        SoftLabels(**{**fields, "temperature": 0.0})
    with pytest.raises(TypeError, match="index dtype"):
        SoftLabels(**{**fields, "indices": good.indices.float()})
    with pytest.raises(TypeError, match="logprobs dtype"):
        SoftLabels(**{**fields, "logprobs": good.logprobs.to(torch.int32)})
    with pytest.raises(ValueError, match="int16 cannot hold"):
        SoftLabels(**{**fields, "indices": good.indices.to(torch.int16), "vocab_size": 40_000})
    with pytest.raises(TypeError, match="torch.Tensor"):
        SoftLabels(**{**fields, "indices": good.indices.tolist()})


def test_validate_accepts_compressed_and_rejects_broken():
    soft_labels = make_soft_labels().validate()
    soft_labels.for_storage(torch.float16).validate()
    soft_labels.for_storage(torch.bfloat16).validate()
    unsorted = SoftLabels(soft_labels.indices, soft_labels.logprobs.flip(-1), soft_labels.tail_logprob, 2.0, 1000)
    with pytest.raises(ValueError, match="descending"):
        unsorted.validate()
    out_of_range = soft_labels.indices.clone()
    out_of_range[0, 0] = 1000
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        SoftLabels(out_of_range, soft_labels.logprobs, soft_labels.tail_logprob, 2.0, 1000).validate()
    repeated = soft_labels.indices.clone()
    repeated[0, 1] = repeated[0, 0]
    with pytest.raises(ValueError, match="repeat"):
        SoftLabels(repeated, soft_labels.logprobs, soft_labels.tail_logprob, 2.0, 1000).validate()
    with pytest.raises(ValueError, match="mass"):
        SoftLabels(soft_labels.indices, soft_labels.logprobs - 0.1, soft_labels.tail_logprob, 2.0, 1000).validate()


def test_storage_conversions_and_sizes():
    large = make_soft_labels(vocab_size=128_256, k=64)
    compact = large.for_storage()
    assert compact.indices.dtype == torch.int32 and compact.logprobs.dtype == torch.float16
    assert compact.tail_logprob.dtype == torch.float32
    assert compact.bytes_per_token == 64 * 6 + 4  # ≤ 6 bytes per kept entry + 4 per token
    small = make_soft_labels(vocab_size=50_257, k=64).for_storage(torch.bfloat16)
    assert small.indices.dtype == torch.uint16 and small.bytes_per_token == 64 * 4 + 4
    assert smallest_index_dtype(65_536) == torch.uint16 and smallest_index_dtype(65_537) == torch.int32
    original = make_soft_labels(vocab_size=50_257, k=64)
    round_trip = original.for_storage().to(index_dtype=torch.int64, logprob_dtype=torch.float32)
    assert torch.equal(round_trip.indices, original.indices.long())
    torch.testing.assert_close(round_trip.logprobs, original.logprobs, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="cannot hold"):
        large.to(index_dtype=torch.uint16)


def test_indexing_reshaping_and_concatenation():
    soft_labels = kdfast.compress_topk(random_logits((2, 3, 50), seed=3), 5)
    assert soft_labels.shape == (2, 3) and soft_labels.k == 5 and len(soft_labels) == 2
    row = soft_labels[1, 2]
    assert row.shape == () and torch.equal(row.indices, soft_labels.indices[1, 2])
    assert soft_labels[:, 1:].shape == (2, 2)
    flat = soft_labels.flatten()
    assert flat.indices.shape == (6, 5) and torch.equal(flat.tail_logprob, soft_labels.tail_logprob.reshape(6))
    assert flat.reshape(3, 2).shape == (3, 2)
    joined = SoftLabels.cat([soft_labels, soft_labels[:1]])
    assert joined.shape == (3, 3) and torch.equal(joined.logprobs[2], soft_labels.logprobs[0])
    other = kdfast.compress_topk(random_logits((2, 3, 50), seed=3), 5, temperature=2.0)
    with pytest.raises(ValueError, match="disagree"):
        SoftLabels.cat([soft_labels, other])
    dense = soft_labels.to_dense_probs()
    torch.testing.assert_close(dense.sum(-1) + soft_labels.tail_logprob.exp(), torch.ones(2, 3))
