"""Tests for the feature-level and relational methods: FitNets hints (`hint_loss`,
`HintLoss`), attention transfer, similarity-preserving KD and relational KD.

Each loss is compared against a float64 NumPy implementation written from the paper's
formula with explicit loops, checked with `torch.autograd.gradcheck`, tested for the
invariances its definition implies and for clear errors on bad input, and used to train a
small student whose features must end up carrying the teacher's knowledge.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from kdfast.methods import (
    HintLoss,
    attention_map,
    attention_transfer_loss,
    hint_loss,
    relational_kd_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)


@pytest.fixture(autouse=True)
def single_thread():
    # The tensors here are tiny: one thread is fastest and immune to a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def as_numpy(tensor):
    return tensor.detach().double().numpy()


def random_orthogonal(size, seed):
    q, _ = torch.linalg.qr(randn(size, size, seed=seed))
    return q


# ---------------------------------------------------------------- FitNets hints

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hint_loss_matches_numpy(reduction):
    student, teacher = randn(4, 3, 5, seed=1), randn(4, 3, 5, seed=2)
    squared = (as_numpy(student) - as_numpy(teacher)) ** 2
    expected = {"mean": squared.mean(), "sum": squared.sum(), "none": squared}[reduction]
    np.testing.assert_allclose(hint_loss(student, teacher, reduction=reduction).numpy(), expected, rtol=1e-12)


def test_hint_module_linear_projection_matches_numpy():
    hint = HintLoss(5, 7).double()
    assert isinstance(hint.projection, torch.nn.Linear)
    student, teacher = randn(2, 3, 5, seed=3), randn(2, 3, 7, seed=4)
    weight, bias = as_numpy(hint.projection.weight), as_numpy(hint.projection.bias)
    projected = np.einsum("btc,oc->bto", as_numpy(student), weight) + bias
    np.testing.assert_allclose(hint(student, teacher).item(), ((projected - as_numpy(teacher)) ** 2).mean(), rtol=1e-12)


def test_hint_module_conv_projection_matches_numpy_loop():
    hint = HintLoss(3, 4, spatial=True, reduction="sum").double()
    assert isinstance(hint.projection, torch.nn.Conv2d) and hint.projection.kernel_size == (1, 1)
    student, teacher = randn(2, 3, 5, 6, seed=5), randn(2, 4, 5, 6, seed=6)
    weight = as_numpy(hint.projection.weight)[:, :, 0, 0]
    bias = as_numpy(hint.projection.bias)
    s, t = as_numpy(student), as_numpy(teacher)
    expected = 0.0
    for n, o, h, w in itertools.product(range(2), range(4), range(5), range(6)):
        projected = sum(weight[o, c] * s[n, c, h, w] for c in range(3)) + bias[o]
        expected += (projected - t[n, o, h, w]) ** 2
    np.testing.assert_allclose(hint(student, teacher).item(), expected, rtol=1e-12)


def test_hint_module_identity_when_widths_agree_unless_asked():
    assert isinstance(HintLoss(6, 6).projection, torch.nn.Identity)
    assert len(list(HintLoss(6, 6).parameters())) == 0
    assert isinstance(HintLoss(6, 6, always_project=True).projection, torch.nn.Linear)


def test_hint_gradients_reach_student_and_projection_not_teacher():
    hint = HintLoss(3, 5, spatial=True).double()
    student = randn(2, 3, 4, 4, seed=7).requires_grad_(True)
    teacher = randn(2, 5, 4, 4, seed=8).requires_grad_(True)
    hint(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hint.parameters())
    assert torch.autograd.gradcheck(lambda s: hint(s, teacher), (randn(2, 3, 4, 4, seed=9).requires_grad_(True),))


def test_hint_module_casts_half_precision_features_to_its_parameters():
    hint = HintLoss(3, 5)  # float32 parameters
    student = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    loss = hint(student, torch.randn(4, 5, dtype=torch.float16))
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad.dtype == torch.bfloat16 and student.grad.abs().sum() > 0


def test_hint_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\].*\(2, 4, 5, 5\)"):
        HintLoss(3, 4, spatial=True)(randn(2, 4, 5, 5, seed=0), randn(2, 4, 5, 5, seed=1))
    with pytest.raises(ValueError, match=r"\[\.\.\., 6\].*\(2, 5\)"):
        HintLoss(4, 6)(randn(2, 4, seed=0), randn(2, 5, seed=1))
    with pytest.raises(ValueError, match=r"\(2, 6, 5, 5\).*\(2, 6, 4, 4\)"):
        HintLoss(3, 6, spatial=True)(randn(2, 3, 5, 5, seed=0), randn(2, 6, 4, 4, seed=1))
    with pytest.raises(ValueError, match="HintLoss"):
        hint_loss(randn(2, 3, seed=0), randn(2, 4, seed=1))
    with pytest.raises(ValueError, match="student_channels"):
        HintLoss(0, 4)
    with pytest.raises(TypeError, match="teacher_features"):
        hint_loss(randn(2, 3, seed=0), [[1.0]])


# ---------------------------------------------------------------- attention transfer

def numpy_attention_map(features, p):
    f = as_numpy(features)
    maps = []
    for sample in f:
        energy = np.zeros(sample.shape[1:])
        for channel in sample:
            energy += np.abs(channel) ** p
        flat = energy.reshape(-1)
        maps.append(flat / math.sqrt((flat ** 2).sum()))
    return np.stack(maps)


@pytest.mark.parametrize("p", [2.0, 1.5, 4.0])
def test_attention_transfer_matches_numpy(p):
    student, teacher = randn(3, 4, 5, 6, seed=10), randn(3, 7, 5, 6, seed=11)  # channels differ
    np.testing.assert_allclose(attention_map(student, p).numpy(), numpy_attention_map(student, p), rtol=1e-12)
    per_sample = ((numpy_attention_map(student, p) - numpy_attention_map(teacher, p)) ** 2).sum(1)
    loss = attention_transfer_loss(student, teacher, p=p, reduction="none")
    np.testing.assert_allclose(loss.numpy(), per_sample, rtol=1e-10)
    np.testing.assert_allclose(attention_transfer_loss(student, teacher, p=p).item(), per_sample.mean(), rtol=1e-10)
    np.testing.assert_allclose(attention_transfer_loss(student, teacher, p=p, reduction="sum").item(),
                               per_sample.sum(), rtol=1e-10)


def test_attention_transfer_invariances_and_range():
    teacher = randn(4, 3, 6, 6, seed=12)
    # Scaling the activations and permuting channels leave the attention map unchanged.
    transformed = 5.0 * teacher[:, [2, 0, 1]]
    assert attention_transfer_loss(transformed, teacher).item() < 1e-24
    loss = attention_transfer_loss(randn(4, 5, 6, 6, seed=13), teacher, reduction="none")
    assert torch.all((loss > 0) & (loss <= 2.0))
    # One spatial dimension (sequences) works as well.
    assert attention_transfer_loss(randn(4, 5, 9, seed=14), randn(4, 2, 9, seed=15)).item() > 0


def test_attention_transfer_gradcheck_and_teacher_constant():
    student = randn(2, 3, 4, 5, seed=16).requires_grad_(True)
    teacher = randn(2, 6, 4, 5, seed=17).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: attention_transfer_loss(s, teacher, reduction="none"), (student,))
    attention_transfer_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_attention_transfer_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\) and \(2, 3, 5, 5\)"):
        attention_transfer_loss(randn(2, 3, 4, 4, seed=0), randn(2, 3, 5, 5, seed=1))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        attention_map(randn(2, 3, seed=0))
    with pytest.raises(ValueError, match="p must be"):
        attention_map(randn(2, 3, 4, seed=0), p=0.0)


# ---------------------------------------------------------------- similarity-preserving KD

def numpy_similarity_preserving(student, teacher):
    def normalised_gram(features):
        q = as_numpy(features).reshape(features.shape[0], -1)
        gram = np.array([[np.dot(a, b) for b in q] for a in q])
        return np.stack([row / math.sqrt((row ** 2).sum()) for row in gram])
    b = student.shape[0]
    return ((normalised_gram(teacher) - normalised_gram(student)) ** 2).sum() / (b * b)


def test_similarity_preserving_matches_numpy():
    student, teacher = randn(5, 3, 2, 2, seed=20), randn(5, 11, seed=21)  # any shapes after the batch
    expected = numpy_similarity_preserving(student, teacher)
    np.testing.assert_allclose(similarity_preserving_loss(student, teacher).item(), expected, rtol=1e-12)
    np.testing.assert_allclose(similarity_preserving_loss(student, teacher, reduction="sum").item(),
                               expected * 25, rtol=1e-12)


def test_similarity_preserving_is_invariant_to_rotation_and_scale_of_features():
    teacher = randn(6, 8, seed=22)
    rotated = 3.0 * teacher @ random_orthogonal(8, seed=23)
    assert similarity_preserving_loss(rotated, teacher).item() < 1e-24
    assert similarity_preserving_loss(randn(6, 8, seed=24), teacher).item() > 1e-3


def test_similarity_preserving_gradcheck_and_errors():
    student = randn(4, 3, seed=25).requires_grad_(True)
    teacher = randn(4, 5, seed=26)
    assert torch.autograd.gradcheck(lambda s: similarity_preserving_loss(s, teacher), (student,))
    with pytest.raises(ValueError, match=r"batch size N.*\(4, 3\) and \(5, 3\)"):
        similarity_preserving_loss(randn(4, 3, seed=0), randn(5, 3, seed=1))
    with pytest.raises(ValueError, match="reduction"):
        similarity_preserving_loss(student, teacher, reduction="none")


# ---------------------------------------------------------------- relational KD

def numpy_huber(x):
    return 0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5


def numpy_rkd_distance(student, teacher):
    def potentials(embeddings):
        e = as_numpy(embeddings).reshape(embeddings.shape[0], -1)
        pairs = [(i, j) for i in range(len(e)) for j in range(len(e)) if i != j]
        distances = {(i, j): np.linalg.norm(e[i] - e[j]) for i, j in pairs}
        mean = sum(distances.values()) / len(pairs)
        return {pair: d / mean for pair, d in distances.items()}
    ps, pt = potentials(student), potentials(teacher)
    return sum(numpy_huber(ps[k] - pt[k]) for k in ps) / len(ps)


def numpy_rkd_angle(student, teacher):
    def potentials(embeddings):
        e = as_numpy(embeddings).reshape(embeddings.shape[0], -1)
        values = {}
        for i, j, k in itertools.permutations(range(len(e)), 3):
            e_ij = (e[i] - e[j]) / np.linalg.norm(e[i] - e[j])
            e_kj = (e[k] - e[j]) / np.linalg.norm(e[k] - e[j])
            values[(i, j, k)] = np.dot(e_ij, e_kj)
        return values
    ps, pt = potentials(student), potentials(teacher)
    return sum(numpy_huber(ps[k] - pt[k]) for k in ps) / len(ps)


def test_rkd_losses_match_numpy():
    student, teacher = 3.0 * randn(6, 4, seed=30), randn(6, 2, 3, seed=31) + 10.0  # widths differ
    # Large student scale keeps some Huber terms in the linear regime.
    distance = numpy_rkd_distance(student, teacher)
    angle = numpy_rkd_angle(student, teacher)
    np.testing.assert_allclose(rkd_distance_loss(student, teacher).item(), distance, rtol=1e-9)
    np.testing.assert_allclose(rkd_angle_loss(student, teacher).item(), angle, rtol=1e-9)
    np.testing.assert_allclose(relational_kd_loss(student, teacher).item(), distance + 2.0 * angle, rtol=1e-9)
    np.testing.assert_allclose(relational_kd_loss(student, teacher, distance_weight=25.0, angle_weight=0.0).item(),
                               25.0 * distance, rtol=1e-9)


def test_rkd_distance_huber_reaches_linear_regime():
    # One far outlier makes some normalised-distance differences exceed 1.
    teacher = randn(5, 3, seed=32)
    student = teacher.clone()
    student[0] += 100.0
    assert abs(numpy_rkd_distance(student, teacher) - rkd_distance_loss(student, teacher).item()) < 1e-9
    assert rkd_distance_loss(student, teacher).item() > 0.5


def test_rkd_is_invariant_to_similarity_transforms():
    teacher = randn(7, 5, seed=33)
    transformed = 4.0 * teacher @ random_orthogonal(5, seed=34) - 2.5
    assert rkd_distance_loss(transformed, teacher).item() < 1e-20
    assert rkd_angle_loss(transformed, teacher).item() < 1e-20
    assert relational_kd_loss(randn(7, 5, seed=35), teacher).item() > 1e-3


def test_rkd_gradcheck_and_coincident_points_stay_finite():
    student = randn(5, 3, seed=36).requires_grad_(True)
    teacher = randn(5, 4, seed=37)
    assert torch.autograd.gradcheck(lambda s: rkd_distance_loss(s, teacher), (student,))
    assert torch.autograd.gradcheck(lambda s: rkd_angle_loss(s, teacher), (student,))
    duplicate = student.detach().clone()
    duplicate[1] = duplicate[0]
    duplicate.requires_grad_(True)
    relational_kd_loss(duplicate, teacher).backward()
    assert torch.isfinite(duplicate.grad).all()


def test_rkd_rejects_bad_input():
    with pytest.raises(ValueError, match=r"batch size N.*\(4, 3\) and \(5, 3\)"):
        rkd_distance_loss(randn(4, 3, seed=0), randn(5, 3, seed=1))
    with pytest.raises(ValueError, match="at least 3 samples"):
        rkd_angle_loss(randn(2, 3, seed=0), randn(2, 3, seed=1))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        rkd_distance_loss(randn(4, seed=0), randn(4, seed=1))
    with pytest.raises(ValueError, match="angle_weight"):
        relational_kd_loss(randn(4, 3, seed=0), randn(4, 3, seed=1), angle_weight=-1.0)


# ---------------------------------------------------------------- training

def fit(parameters, loss_fn, steps, lr=1e-2):
    optimizer = torch.optim.Adam(parameters, lr=lr)
    with torch.no_grad():
        initial = loss_fn().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return initial, loss_fn().item()


def test_hint_training_lets_the_teacher_head_read_the_student():
    # The teacher's classifier head, applied to the projected student features, must agree
    # with the teacher after training on the hint loss alone (no labels used).
    generator = torch.Generator().manual_seed(40)
    inputs = torch.randn(256, 10, generator=generator)
    teacher_hidden = torch.tanh(inputs @ torch.randn(10, 16, generator=generator) / math.sqrt(10))
    teacher_head = torch.randn(16, 4, generator=generator)
    labels = (teacher_hidden @ teacher_head).argmax(-1)
    torch.manual_seed(41)
    student = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    hint = HintLoss(8, 16)

    def agreement():
        with torch.no_grad():
            return ((hint.projection(student(inputs)) @ teacher_head).argmax(-1) == labels).float().mean().item()

    initial_agreement = agreement()
    initial, final = fit(list(student.parameters()) + list(hint.parameters()),
                         lambda: hint(student(inputs), teacher_hidden), steps=200)
    assert final < 0.2 * initial
    assert initial_agreement < 0.5 and agreement() > 0.8  # chance is 0.25


def make_blob_images(seed, num_samples=96):
    """Two-channel 8×8 images: a blob in the labelled quadrant in channel 0 and a distractor
    blob in another quadrant in channel 1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (num_samples,), generator=generator)
    distractors = (labels + torch.randint(1, 4, (num_samples,), generator=generator)) % 4
    images = 0.1 * torch.randn(num_samples, 2, 8, 8, generator=generator)
    offsets = torch.randint(0, 3, (num_samples, 2, 2), generator=generator)
    for sample in range(num_samples):
        for channel, quadrant in ((0, labels[sample]), (1, distractors[sample])):
            row = 4 * (int(quadrant) // 2) + int(offsets[sample, channel, 0])
            column = 4 * (int(quadrant) % 2) + int(offsets[sample, channel, 1])
            images[sample, channel, row:row + 2, column:column + 2] += 1.0
    return images, labels


def quadrant_of_attention(features):
    maps = attention_map(features).view(-1, 8, 8)
    masses = torch.stack([maps[:, :4, :4].sum((1, 2)), maps[:, :4, 4:].sum((1, 2)),
                          maps[:, 4:, :4].sum((1, 2)), maps[:, 4:, 4:].sum((1, 2))], dim=1)
    return masses.argmax(1)


def test_attention_transfer_training_teaches_where_to_look():
    images, labels = make_blob_images(seed=42)
    teacher_features = images[:, :1]  # the teacher attends to channel 0 only
    assert torch.equal(quadrant_of_attention(teacher_features), labels)
    torch.manual_seed(43)
    student = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        initial_accuracy = (quadrant_of_attention(student(images)) == labels).float().mean().item()
    initial, final = fit(student.parameters(), lambda: attention_transfer_loss(student(images), teacher_features),
                         steps=80)
    with torch.no_grad():
        accuracy = (quadrant_of_attention(student(images)) == labels).float().mean().item()
    assert final < 0.1 * initial
    assert initial_accuracy < 0.8 and accuracy > 0.95


def make_quadrant_embeddings(seed, num_samples):
    """Inputs whose class is the sign pattern of two of eight coordinates (the other six are
    larger noise), and teacher embeddings clustered by class."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (num_samples, 2), generator=generator)
    labels = 2 * signs[:, 0] + signs[:, 1]
    informative = (2.0 * signs.float() - 1.0) * (0.5 + torch.rand(num_samples, 2, generator=generator))
    inputs = torch.cat([informative, 2.0 * torch.randn(num_samples, 6, generator=generator)], dim=1)
    centres = 2.0 * torch.randn(4, 6, generator=generator)
    teacher = centres[labels] + 0.3 * torch.randn(num_samples, 6, generator=generator)
    return inputs, labels, teacher


def nearest_centroid_accuracy(embeddings, labels):
    centroids = torch.stack([embeddings[labels == k].mean(0) for k in range(4)])
    return (torch.cdist(embeddings, centroids).argmin(1) == labels).float().mean().item()


@pytest.mark.parametrize("loss_fn", [similarity_preserving_loss, relational_kd_loss], ids=["sp", "rkd"])
def test_relation_training_clusters_student_embeddings_by_class(loss_fn):
    inputs, labels, teacher = make_quadrant_embeddings(seed=44, num_samples=48)
    assert nearest_centroid_accuracy(teacher, labels) == 1.0
    torch.manual_seed(45)
    student = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        initial_accuracy = nearest_centroid_accuracy(student(inputs), labels)
    initial, final = fit(student.parameters(), lambda: loss_fn(student(inputs), teacher), steps=150)
    with torch.no_grad():
        accuracy = nearest_centroid_accuracy(student(inputs), labels)
    assert final < 0.2 * initial
    assert initial_accuracy < 0.75 and accuracy > 0.95
