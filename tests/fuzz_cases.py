"""Seeded random cases for tests/functional/test_fuzz.py: every public loss entry point.

`draw_case(seed)` draws an entry point (`kdfast.functional` kd_loss, sparse_kd_loss,
compress_topk, multi_teacher_kd_loss, fused_linear_kd_loss, or the `kdfast.KDLoss`-style
modules), a shape, dtypes, a layout, values, a temperature, options and labels; `check_case`
runs it and the float64 oracle (`kdfast.reference`) and applies the rule of
tests/fp32_rows.py. A case is either an error from both (ValueError, TypeError or RuntimeError,
with a message) or the oracle's loss and student gradient within float32 accuracy, with NaN
and ±inf exactly where the oracle has them. The dense kernels count a probability below
float32's normal range (exp(−87)) as exactly 0, so where the oracle's +inf comes only from such
a probability facing a masked entry, the comparison is with the oracle on the flushed inputs
(`_flushed`). `check_seeds` runs a range of seeds (the CPU variant runs use it in a subprocess).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

import kdfast
from fp32_rows import (
    EPS32,
    K,
    assert_grad_match,
    assert_loss_match,
    finite_spread,
    row_tolerances,
    sparse_tvd_ties,
    tvd_ties,
)
from kdfast import functional, reference
from kdfast.reference.multi_teacher import normalised_weights
from kdfast.softlabels import SoftLabels

ENTRY_POINTS = ("kd_loss", "KDLoss", "sparse_kd_loss", "SparseKDLoss", "compress_topk", "multi_teacher_kd_loss",
                "MultiTeacherKDLoss", "multi_teacher_soft_labels", "fused_linear_kd_loss", "FusedLinearKDLoss")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("none", "mean", "sum", "batchmean")
DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64)
EXPECTED_ERRORS = (ValueError, TypeError, RuntimeError)
INJECTIONS = ("nan_one", "nan_row", "ninf_one", "ninf_row", "ninf_all_but_one", "pinf_one", "max_one", "min_one",
              "max_and_min")


@dataclass
class Case:
    seed: int
    entry: str
    device: str
    leading: tuple
    vocab: int
    options: dict
    tensors: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        def describe(value):
            if isinstance(value, torch.Tensor):
                return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
            if isinstance(value, SoftLabels):
                return f"SoftLabels(k={value.k}, {str(value.logprobs.dtype).replace('torch.', '')})"
            if isinstance(value, list):
                return [describe(item) for item in value]
            return value

        shapes = {name: describe(value) for name, value in self.tensors.items()}
        return (f"seed={self.seed} {self.entry} leading={self.leading} V={self.vocab} {self.options} {shapes} "
                f"{self.notes}")


def _temperature(rng: random.Random) -> float:
    choice = rng.random()
    if choice < 0.55:
        return rng.choice([1.0, 2.0, 0.5, 4.0, 1.7, 3.3])
    if choice < 0.85:
        return 10.0 ** rng.uniform(-20.0, 20.0)  # anywhere in the accepted range
    return rng.choice([1e-20, 1e20, 1e-25, 1e25, 0.0, -1.0, math.nan, math.inf])


def _values(rng: random.Random, generator: torch.Generator, leading, vocab, dtype, notes, name, scale=None,
            injections=INJECTIONS):
    """[*leading, vocab] logits of `dtype`: normal values times a scale, with injected NaN / ±inf / extremes
    (the ends of the dtype's range, of float32's for float64: the contract's range)."""
    finfo = torch.finfo(torch.float32 if dtype == torch.float64 else dtype)
    if scale is None:
        scale = rng.choice([1.0, 3.0, 3.0, 30.0, 1e4, 1e30, 1e38])
    scale = min(scale, finfo.max / 8)
    values = torch.randn(tuple(leading) + (vocab,), generator=generator, dtype=torch.float64) * scale
    rows = values.reshape(-1, vocab)
    for row in range(rows.shape[0]):
        if rng.random() < 0.2:
            kind = rng.choice(injections)
            notes.append(f"{name}[{row}]:{kind}")
            column = rng.randrange(vocab)
            if kind == "nan_one":
                rows[row, column] = math.nan
            elif kind == "nan_row":
                rows[row] = math.nan
            elif kind == "ninf_one":
                rows[row, column] = -math.inf
            elif kind == "ninf_row":
                rows[row] = -math.inf
            elif kind == "ninf_all_but_one":
                keep = rows[row, column].item()
                rows[row] = -math.inf
                rows[row, column] = keep
            elif kind == "pinf_one":
                rows[row, column] = math.inf
            elif kind == "max_one":
                rows[row, column] = finfo.max
            elif kind == "min_one":
                rows[row, column] = finfo.min
            else:
                rows[row, column] = finfo.max
                rows[row, (column + 1) % vocab] = finfo.min
    return rows.reshape(values.shape).to(dtype)


def _layout(rng: random.Random, tensor: torch.Tensor, notes, name) -> torch.Tensor:
    """The same values in another memory layout: a vocabulary stride of 2, a row slice, or transposed rows."""
    choice = rng.random()
    if choice < 0.2:
        wide = torch.empty(tensor.shape[:-1] + (2 * tensor.shape[-1],), dtype=tensor.dtype)
        wide[..., ::2] = tensor
        notes.append(f"{name}:vocab-stride-2")
        return wide[..., ::2]
    if choice < 0.35 and tensor.dim() >= 2:
        tall = torch.empty((tensor.shape[0] * 2,) + tensor.shape[1:], dtype=tensor.dtype)
        tall[::2] = tensor
        notes.append(f"{name}:row-stride-2")
        return tall[::2]
    if choice < 0.45 and tensor.dim() >= 3:
        notes.append(f"{name}:transposed-rows")
        return tensor.transpose(0, 1).contiguous().transpose(0, 1)
    return tensor


def _labels(rng: random.Random, generator: torch.Generator, leading, vocab, ignore_index, device, notes):
    labels = torch.randint(0, vocab, tuple(leading), generator=generator)
    flat = labels.reshape(-1)
    for row in range(flat.numel()):
        if rng.random() < 0.25:
            flat[row] = ignore_index
    choice = rng.random()
    if choice < 0.05 and flat.numel() and device == "cpu":  # out of range (the CUDA kernels give NaN rows instead)
        flat[rng.randrange(flat.numel())] = vocab + 3
        notes.append("label out of range")
    elif choice < 0.1:
        notes.append("labels int32")
        labels = labels.to(torch.int32)
    return labels


def _options(rng: random.Random, entry: str) -> dict:
    alpha = rng.choice([0.0, 0.0, 0.3, 0.5, 1.0])
    options = dict(divergence=rng.choice(DIVERGENCES), temperature=_temperature(rng), alpha=alpha,
                   beta=rng.choice([0.5, 0.2, 0.9]), reduction=rng.choice(REDUCTIONS),
                   label_smoothing=rng.choice([0.0, 0.0, 0.1]), t2_scale=rng.random() < 0.8,
                   ignore_index=rng.choice([-100, -100, 0]))
    if rng.random() < 0.06:  # one invalid option
        bad = rng.choice([("alpha", 1.5), ("alpha", -0.1), ("label_smoothing", 1.0), ("divergence", "kl"),
                          ("reduction", "avg"), ("beta", 0.0), ("beta", 1.0)])
        options[bad[0]] = bad[1]
        if bad[0] == "beta":
            options["divergence"] = "jsd"
    return options


def draw_case(seed: int, device: str = "cpu") -> Case:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    entry = ENTRY_POINTS[seed % len(ENTRY_POINTS)]
    leading = tuple(rng.choice([1, 2, 3, 4]) for _ in range(rng.choice([0, 1, 1, 2])))
    if entry.startswith(("fused", "Fused")) and not leading:
        leading = (3,)
    vocab = rng.choice([1, 2, 5, 37, 130, 600])
    case = Case(seed=seed, entry=entry, device=device, leading=leading, vocab=vocab, options=_options(rng, entry))
    notes = case.notes
    with_labels = case.options["alpha"] > 0 or rng.random() < 0.5
    labels = None
    if with_labels:
        labels = _labels(rng, generator, leading, vocab, case.options["ignore_index"], device, notes)
    case.tensors["labels"] = labels
    student_dtype = rng.choice(DTYPES)
    teacher_dtype = student_dtype if rng.random() < 0.6 else rng.choice(DTYPES)
    if entry in ("fused_linear_kd_loss", "FusedLinearKDLoss"):
        dtype = rng.choice([torch.float32, torch.float64])
        # float32 logits h·Wᵀ of hidden states near the float range overflow before any loss: NaN and ±inf only
        hidden = _values(rng, generator, leading, 8, dtype, notes, "hidden", scale=rng.choice([0.3, 1.0, 3.0]),
                         injections=INJECTIONS[:6])
        case.tensors["hidden"] = _layout(rng, hidden, notes, "hidden")
        case.tensors["weight"] = torch.randn(vocab, 8, generator=generator, dtype=torch.float64).to(dtype) / 2
        case.tensors["teacher"] = _values(rng, generator, leading, vocab, rng.choice(DTYPES), notes, "teacher",
                                          scale=rng.choice([1.0, 3.0, 30.0]))
        case.options["chunk_size"] = rng.choice([None, 1, 2, 5])
        return case
    case.tensors["student"] = _layout(rng, _values(rng, generator, leading, vocab, student_dtype, notes, "student"),
                                      notes, "student")
    if entry == "compress_topk":
        case.tensors["teacher"] = case.tensors.pop("student")
        case.options = dict(k=rng.choice([1, 2, vocab, vocab + 1, max(1, vocab // 3)]),
                            temperature=case.options["temperature"],
                            index_dtype=rng.choice([torch.int32, torch.int64, torch.int16, torch.uint16]))
        return case
    teachers = 1 if entry in ("kd_loss", "KDLoss", "sparse_kd_loss", "SparseKDLoss") else rng.choice([1, 2, 3])
    case.tensors["teachers"] = [
        _layout(rng, _values(rng, generator, leading, vocab, teacher_dtype, notes, f"teacher{m}"), notes, f"teacher{m}")
        for m in range(teachers)]
    if entry.startswith(("multi", "Multi")):
        case.options["combine"] = rng.choice(["sum", "mixture"])
        weight_kind = rng.choice(["none", "list", "tensor", "per_row"])
        if weight_kind == "list":
            case.options["weights"] = [rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in range(teachers)]
            if sum(case.options["weights"]) == 0:
                case.options["weights"][0] = 1.0
        elif weight_kind in ("tensor", "per_row"):
            shape = (teachers,) if weight_kind == "tensor" else (teachers,) + tuple(leading)
            case.options["weights"] = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.05
    if entry in ("sparse_kd_loss", "SparseKDLoss", "multi_teacher_soft_labels"):
        case.options["tail"] = rng.choice(["bucket", "renormalize"])
        case.options["k"] = rng.choice([1, 2, vocab, max(1, vocab // 3)])
        case.options["storage"] = rng.choice([None, torch.float16, torch.bfloat16])
    return case


# ---------------------------------------------------------------- running a case


def _reduction_weights(reduction: str, labels, rows: int, ignore_index: int) -> torch.Tensor:
    if reduction == "mean":
        valid = rows if labels is None else int((labels.reshape(-1) != ignore_index).sum())
        return torch.full((rows,), 1.0 / max(valid, 1), dtype=torch.float64)
    if reduction == "batchmean":
        return torch.full((rows,), 1.0 / max(rows, 1), dtype=torch.float64)
    return torch.ones(rows, dtype=torch.float64)


def _reduce(row_loss: torch.Tensor, reduction: str, labels, ignore_index: int, leading) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}")
    if reduction == "none":
        return row_loss.reshape(leading)
    if reduction == "sum":
        return row_loss.sum()
    if reduction == "batchmean":
        return row_loss.sum() / max(row_loss.numel(), 1)
    valid = row_loss.numel() if labels is None else int((labels.reshape(-1) != ignore_index).sum())
    return row_loss.sum() / max(valid, 1)


def _soft_labels(case: Case, teacher: torch.Tensor, temperature: float) -> SoftLabels:
    """The case's soft labels of one teacher: compressed by the kernel, stored as asked."""
    labels = kdfast.compress_topk(teacher, min(case.options["k"], case.vocab), temperature=temperature)
    storage = case.options["storage"]
    if storage is not None:
        labels = labels.for_storage(storage)
    return labels


def _teacher_soft_labels(case: Case) -> list:
    """Every teacher's soft labels: compressed by the kernel, or for combine="mixture" all at the
    first teacher's indices (exact log-probabilities and tails, stored like the kernel's)."""
    temperature = _soft_temperature(case)
    teachers = [t.to(case.device) for t in case.tensors["teachers"]]
    first = _soft_labels(case, teachers[0], temperature)
    if case.options.get("combine") != "mixture":
        return [first] + [_soft_labels(case, t, temperature) for t in teachers[1:]]
    indices = first.indices.to(torch.int32).to(torch.int64)
    result = [first]
    for teacher in teachers[1:]:
        log_probs = torch.log_softmax(teacher.double() / temperature, dim=-1)
        outside = log_probs.scatter(-1, indices, -math.inf)
        stored = first.logprobs.dtype
        result.append(SoftLabels(indices=first.indices, logprobs=log_probs.gather(-1, indices).to(stored),
                                 tail_logprob=outside.logsumexp(-1).to(first.tail_logprob.dtype),
                                 temperature=temperature, vocab_size=case.vocab))
    return result


def _as_float64(labels: SoftLabels) -> SoftLabels:
    return SoftLabels(indices=labels.indices.cpu(), logprobs=labels.logprobs.cpu().double(),
                      tail_logprob=labels.tail_logprob.cpu().double(), temperature=labels.temperature,
                      vocab_size=labels.vocab_size)


def _teacher_spread(values) -> torch.Tensor:
    return torch.stack([finite_spread(v.reshape(-1, v.shape[-1])) for v in values]).amax(0)


def _soft_temperature(case: Case) -> float:
    temperature = case.options["temperature"]
    return temperature if math.isfinite(temperature) and 1e-20 <= temperature <= 1e20 else 1.0


def _run(case: Case, oracle: bool):
    """(loss, student-side leaf) of the case, by the entry point or by the oracle (float64)."""
    device = "cpu" if oracle else case.device
    options = {k: v for k, v in case.options.items() if k not in ("k", "storage", "chunk_size")}
    labels = case.tensors["labels"]
    labels = None if labels is None else labels.to(device)
    cast = (lambda t: t.detach().to(torch.float64).cpu()) if oracle else (lambda t: t.detach().to(device))
    if case.entry in ("fused_linear_kd_loss", "FusedLinearKDLoss"):
        hidden = cast(case.tensors["hidden"]).requires_grad_(True)
        weight = cast(case.tensors["weight"]).requires_grad_(True)
        teacher = cast(case.tensors["teacher"])
        if oracle:
            return reference.kd_loss(hidden @ weight.T, teacher, labels, **options), (hidden, weight)
        chunk = {"chunk_size": case.options["chunk_size"]}
        if case.entry == "FusedLinearKDLoss":
            return kdfast.FusedLinearKDLoss(**chunk, **options)(hidden, weight, teacher, labels), (hidden, weight)
        return functional.fused_linear_kd_loss(hidden, weight, teacher, labels, **chunk, **options), (hidden, weight)
    if case.entry == "compress_topk":
        teacher = cast(case.tensors["teacher"])
        function = reference.compress_topk if oracle else kdfast.compress_topk
        return function(teacher, case.options["k"], temperature=case.options["temperature"],
                        index_dtype=case.options["index_dtype"]), None
    student = cast(case.tensors["student"]).requires_grad_(True)
    teachers = [cast(t) for t in case.tensors["teachers"]]
    if "weights" in options and isinstance(options["weights"], torch.Tensor):
        options["weights"] = options["weights"].to(device)
    if case.entry in ("kd_loss", "KDLoss"):
        if oracle:
            return reference.kd_loss(student, teachers[0], labels, **options), student
        if case.entry == "KDLoss":
            return kdfast.KDLoss(**options)(student, teachers[0], labels), student
        return functional.kd_loss(student, teachers[0], labels, **options), student
    if case.entry.startswith(("multi_teacher_kd", "Multi")):
        if oracle:
            return reference.multi_teacher_kd_loss(student, teachers, labels, **options), student
        if case.entry == "MultiTeacherKDLoss":  # teachers as one [M, ..., V] tensor where they share a dtype
            stacked = len({t.dtype for t in teachers}) == 1
            # per-teacher weights [M] go to the constructor, per-row weights [M, ...] to forward
            module_options = dict(options)
            weights = module_options.pop("weights", None)
            per_row = isinstance(weights, torch.Tensor) and weights.dim() > 1
            module = kdfast.MultiTeacherKDLoss(**module_options, weights=None if per_row else weights)
            return module(student, torch.stack(teachers) if stacked else teachers, labels,
                          weights=weights if per_row else None), student
        return functional.multi_teacher_kd_loss(student, teachers, labels, **options), student
    # soft-label teachers: compressed once (by the kernel), the oracle reads the same stored values
    if "soft" not in case.tensors:
        case.tensors["soft"] = _teacher_soft_labels(case)
    soft = [_as_float64(s) for s in case.tensors["soft"]] if oracle else case.tensors["soft"]
    if case.entry in ("sparse_kd_loss", "SparseKDLoss"):
        if oracle:
            return reference.sparse_kd_loss(student, soft[0], labels, **options), student
        if case.entry == "SparseKDLoss":
            return kdfast.SparseKDLoss(**options)(student, soft[0], labels), student
        return functional.sparse_kd_loss(student, soft[0], labels, **options), student
    if not oracle:
        return functional.multi_teacher_kd_loss(student, soft, labels, **options), student
    return _soft_multi_oracle(case, student, soft, labels, options), student


def _soft_multi_oracle(case, student, soft, labels, options):
    """multi_teacher_kd_loss with SoftLabels teachers in float64: Σ_m w̄_m ℓ_m ("sum") or the
    loss against the teachers' mixture ("mixture", same indices required)."""
    options = dict(options)
    combine, weights, reduction = options.pop("combine"), options.pop("weights", None), options.pop("reduction")
    leading = student.shape[:-1]
    flat_labels = None if labels is None else labels.reshape(-1)
    valid = None if flat_labels is None else flat_labels != options["ignore_index"]
    if isinstance(weights, torch.Tensor):
        weights = weights.cpu()
    weight_rows = normalised_weights(weights, len(soft), leading, valid, torch.float64, torch.device("cpu"))
    if combine == "sum":  # a zero weight drops the teacher, unless its loss is NaN (reference.multi_teacher)
        rows = 0.0
        for labels_m, weight in zip(soft, weight_rows):
            term = reference.sparse_kd_loss(student, labels_m, labels, reduction="none", **options).reshape(-1)
            rows = rows + torch.where(weight > 0, weight * term, torch.where(torch.isnan(term), term, 0.0))
        return _reduce(rows, reduction, labels, options["ignore_index"], leading)
    for index, s in enumerate(soft[1:], start=1):
        if not torch.equal(s.indices, soft[0].indices):
            raise ValueError(f"teacher {index} keeps other indices")
    flat = [s.flatten() for s in soft]
    log_w = weight_rows.log()
    mixed = SoftLabels(indices=soft[0].indices,
                       logprobs=torch.stack([s.logprobs + lw[:, None] for s, lw in zip(flat, log_w)]).logsumexp(0)
                       .reshape(soft[0].logprobs.shape),
                       tail_logprob=torch.stack([s.tail_logprob + lw for s, lw in zip(flat, log_w)]).logsumexp(0)
                       .reshape(soft[0].tail_logprob.shape),
                       temperature=soft[0].temperature, vocab_size=soft[0].vocab_size)
    return reference.sparse_kd_loss(student, mixed, labels, reduction=reduction, **options)


def _outcome(case: Case, oracle: bool):
    try:
        return _run(case, oracle), None
    except EXPECTED_ERRORS as error:
        assert str(error), f"{case}: {type(error).__name__} without a message"
        return None, error


DENSE_TEACHER_ENTRIES = ("kd_loss", "KDLoss", "multi_teacher_kd_loss", "MultiTeacherKDLoss", "fused_linear_kd_loss",
                         "FusedLinearKDLoss")


def _flushed(case: Case) -> Case:
    """The case with every logit whose probability the float32 kernels flush to 0 set to -inf:
    exp((x − max)/T) below e^−87, under float32's normal range, on the side whose probability
    weighs the divergence's terms (the teacher's for forward_kl; the student's for reverse_kl,
    and only without the cross-entropy, which reads every logit). Only a term where such a
    probability meets a masked entry of the other side changes: the oracle's +inf becomes the
    finite value of the float32 computation."""
    temperature = case.options["temperature"]

    def flush(values: torch.Tensor) -> torch.Tensor:
        wide = values.detach().double()
        top = wide.amax(-1, keepdim=True)
        tiny = (wide - torch.where(torch.isfinite(top), top, 0.0)) / temperature < -87.0
        return values.detach().masked_fill(tiny, -math.inf)

    tensors = dict(case.tensors)
    if case.options["divergence"] == "forward_kl":
        if "teachers" in tensors:
            tensors["teachers"] = [flush(t) for t in tensors["teachers"]]
        if "teacher" in tensors:
            tensors["teacher"] = flush(tensors["teacher"])
    elif "student" in tensors and case.options["alpha"] == 0:
        tensors["student"] = flush(tensors["student"])
    return Case(seed=case.seed, entry=case.entry, device=case.device, leading=case.leading, vocab=case.vocab,
                options=case.options, tensors=tensors, notes=case.notes + ["flushed oracle"])


def _row_case(case: Case) -> Case:
    return Case(seed=case.seed, entry=case.entry, device=case.device, leading=case.leading, vocab=case.vocab,
                options=dict(case.options, reduction="none"), tensors=case.tensors, notes=case.notes)


def check_case(case: Case) -> None:
    """Runs the case and the oracle; asserts the rule of the module docstring."""
    result, error = _outcome(case, oracle=False)
    expected, expected_error = _outcome(case, oracle=True)
    if error is not None or expected_error is not None:
        assert error is not None and expected_error is not None, (
            f"{case}: raised {error!r} but the oracle raised {expected_error!r}")
        return
    if case.entry == "compress_topk":
        _check_compress(case, result[0], expected[0])
        return
    oracle_case = case
    if case.entry in DENSE_TEACHER_ENTRIES and case.options["divergence"] in ("forward_kl", "reverse_kl"):
        with torch.no_grad():
            rows, _ = _run(_row_case(case), oracle=False)
            expected_rows, _ = _run(_row_case(case), oracle=True)
        if bool((torch.isposinf(expected_rows.cpu()) & torch.isfinite(rows.cpu())).any()):
            oracle_case = _flushed(case)
            expected = _run(oracle_case, oracle=True)
    _check_loss(case, result, expected, oracle_case)


def _check_compress(case: Case, result: SoftLabels, expected: SoftLabels) -> None:
    k = case.options["k"]
    values = torch.cat([result.logprobs.cpu().double(), result.tail_logprob.cpu().double()[..., None]], -1)
    # the oracle rounded to the result's dtype (log-probabilities below its range are -inf there)
    expected_values = torch.cat([expected.logprobs, expected.tail_logprob[..., None]], -1)
    expected_values = expected_values.to(result.logprobs.dtype).double()
    values, expected_values = values.reshape(-1, k + 1), expected_values.reshape(-1, k + 1)
    nan_rows = torch.isnan(expected_values).any(-1)
    assert torch.equal(torch.isnan(values).any(-1), nan_rows), f"{case}: NaN rows differ"
    assert bool(torch.isnan(values[nan_rows]).all()), f"{case}: a NaN row must be all NaN"
    good = ~nan_rows
    indices = result.indices.cpu().to(torch.int32).to(torch.int64).reshape(-1, k)
    expected_indices = expected.indices.to(torch.int32).to(torch.int64).reshape(-1, k)
    assert result.indices.dtype == case.options["index_dtype"], f"{case}: index dtype {result.indices.dtype}"
    assert torch.equal(indices[good], expected_indices[good]), f"{case}: indices differ"
    teacher = case.tensors["teacher"].reshape(-1, case.vocab)
    spread = finite_spread(teacher)[good, None] / case.options["temperature"]
    atol = K * EPS32 * (2.0 + math.log(case.vocab + 1) + spread)
    assert torch.equal(torch.isinf(values[good]), torch.isinf(expected_values[good])), f"{case}: -inf entries differ"
    finite = torch.isfinite(expected_values[good])
    difference = (values[good] - expected_values[good]).abs()
    allowed = 1e-5 * expected_values[good].abs() + atol.expand_as(difference)
    assert bool((difference[finite] <= allowed[finite]).all()), (
        f"{case}: log-probabilities differ by {float(difference[finite].max()):.3e}")


def _check_loss(case: Case, result, expected, oracle_case: Case) -> None:
    (loss, leaves), (expected_loss, expected_leaves) = result, expected
    options = case.options
    reduction = options["reduction"]
    assert loss.dtype in (torch.float32, torch.float64) and tuple(loss.shape) == tuple(expected_loss.shape), (
        f"{case}: loss {loss.dtype} {tuple(loss.shape)} vs oracle {tuple(expected_loss.shape)}")
    generator = torch.Generator().manual_seed(case.seed + 1)
    grad_output = torch.rand(tuple(loss.shape), generator=generator, dtype=torch.float64) + 0.5
    loss.backward(grad_output.to(device=loss.device, dtype=loss.dtype))
    expected_loss.backward(grad_output)

    # The oracle's row losses (reduction none) classify the rows and size the tolerances.
    with torch.no_grad():
        row_expected, _ = _run(_row_case(oracle_case), oracle=True)
    row_expected = row_expected.detach().reshape(-1)
    rows = row_expected.numel()
    labels = case.tensors["labels"]
    weights = _reduction_weights(reduction, labels, rows, options["ignore_index"])
    row_grad_output = grad_output.reshape(-1).expand(rows) if reduction == "none" else grad_output.expand(rows)
    temperature = options["temperature"]
    fused = case.entry in ("fused_linear_kd_loss", "FusedLinearKDLoss")
    if fused:
        hidden = case.tensors["hidden"].detach().double().reshape(-1, 8)
        student_rows = hidden @ case.tensors["weight"].double().T
        teacher_values = [case.tensors["teacher"]]
    else:
        student_rows = case.tensors["student"].detach().double().reshape(-1, case.vocab)
        if "soft" in case.tensors:
            teacher_values = [torch.cat([s.logprobs.cpu().double(), s.tail_logprob.cpu().double()[..., None]], -1)
                              * temperature for s in case.tensors["soft"]]
        else:
            teacher_values = case.tensors["teachers"]
    teacher_spread = _teacher_spread([v.detach().double().cpu() for v in teacher_values]) / temperature
    ties = _tvd_ties(case, student_rows, teacher_values, temperature) if options["divergence"] == "tvd" else None
    loss_atol, grad_atol = row_tolerances(student_rows, teacher_spread, temperature=temperature,
                                          alpha=options["alpha"], t2_scale=options["t2_scale"],
                                          divergence=options["divergence"], grad_weights=row_grad_output * weights,
                                          tvd_ties=ties)
    finite_rows = torch.isfinite(row_expected)
    row_overflow = False
    if reduction != "none":
        loss_atol = (weights * loss_atol)[finite_rows].sum()
        row_overflow = loss.dtype == torch.float32 and bool(
            (finite_rows & (weights > 0) & (row_expected.abs() > torch.finfo(torch.float32).max)).any())
    context = str(case)
    assert_loss_match(loss, expected_loss, loss_atol, context, row_overflow)
    if fused:
        hidden_leaf, _ = leaves
        expected_hidden, _ = expected_leaves
        scale = 8.0 * float(case.tensors["weight"].double().abs().max()) * math.sqrt(case.vocab)
        assert_grad_match(hidden_leaf.grad.reshape(rows, -1), expected_hidden.grad.reshape(rows, -1), row_expected,
                          grad_atol * scale, context, hidden_leaf.dtype, loss.dtype)
        return
    grad, expected_grad = leaves.grad, expected_leaves.grad
    assert grad is not None and grad.dtype == leaves.dtype and grad.shape == leaves.shape, f"{context}: gradient"
    # SoftLabels teachers: the gradient sums M sparse losses' gradients, each rounded to its dtype
    roundings = len(case.tensors["teachers"]) + 1 if case.entry == "multi_teacher_soft_labels" else 1
    assert_grad_match(grad.reshape(rows, -1), expected_grad.reshape(rows, -1), row_expected, grad_atol, context,
                      grad.dtype, loss.dtype, roundings)


def _tvd_ties(case: Case, student_rows: torch.Tensor, teacher_values, temperature: float) -> torch.Tensor:
    """Rows where the student's and a teacher's distributions have an entry in common to float32's
    resolution (tests/fp32_rows.py, tvd_ties): full rows, or for soft labels the kept buckets."""
    q = torch.softmax(student_rows.double() / temperature, -1)
    ties = torch.zeros(q.shape[0], dtype=torch.bool)
    if "soft" in case.tensors:
        for labels in case.tensors["soft"]:
            flat = labels.flatten()
            ties |= sparse_tvd_ties(student_rows, flat.indices, flat.logprobs, flat.tail_logprob, temperature,
                                    case.options["tail"])
        return ties
    teachers = [torch.softmax(v.detach().double().cpu().reshape(q.shape) / temperature, -1) for v in teacher_values]
    teachers.append(sum(teachers) / len(teachers))
    for p in teachers:
        ties |= tvd_ties(p, q)
    return ties


def check_seeds(seeds, device: str = "cpu") -> None:
    for seed in seeds:
        check_case(draw_case(seed, device))
