"""What a compressed student costs (`kdfast.compression.measure`): serialised bytes follow the
stored dtype, non-zero counts apply pruning masks and count a tied weight once, and the latency
helper leaves the model's mode as it found it and refuses meaningless settings.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdfast.compression import apply_masks, latency_ms, model_bytes, nonzero_parameters, prepare_pruning


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, ids):
        return self.head(self.embedding(ids))


@pytest.mark.parametrize("dtype, width", [(torch.float32, 4), (torch.float16, 2), (torch.int8, 1)])
def test_model_bytes_grow_with_the_stored_width(dtype, width):
    small, large = nn.Linear(8, 8), nn.Linear(8, 8)
    small.register_buffer("payload", torch.zeros(1000, dtype=dtype))
    large.register_buffer("payload", torch.zeros(3000, dtype=dtype))
    assert model_bytes(large) - model_bytes(small) == pytest.approx(2000 * width, abs=256)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_nonzero_parameters_apply_masks_and_count_tied_weights_once(pattern):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    dense = nonzero_parameters(model)
    prepare_pruning(model, pattern)
    apply_masks(model, pattern, 0.5)
    assert nonzero_parameters(model) == dense - (16 * 8 + 8 * 4) // 2
    assert nonzero_parameters(Tied()) == 50 * 16


@pytest.mark.parametrize("training", [True, False])
def test_latency_ms_keeps_the_mode(training):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train(training)
    assert latency_ms(model, torch.randn(2, 4), repeats=3, warmup=1) > 0
    assert model.training is training


@pytest.mark.parametrize("repeats, warmup", [(0, 1), (3, -1)])
def test_latency_ms_refuses_meaningless_settings(repeats, warmup):
    with pytest.raises(ValueError, match="repeats >= 1"):
        latency_ms(nn.Linear(2, 2), torch.randn(1, 2), repeats=repeats, warmup=warmup)
