"""Parameters on the meta device (shapes, no values) are one clear error on every way to estimate
a gradient, not a raw PyTorch error from deep inside a derivative path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import forwardgrad as fg

WAYS = {
    "forward, general path": lambda: fg.ForwardGradient(2, seed=0, fast=False),
    "forward, low-rank tangents": lambda: fg.ForwardGradient(2, seed=0, rank=1),
    "activity perturbation": lambda: fg.ActivityPerturbation(tangents=2, seed=0),
    "zeroth-order, several tangents": lambda: fg.ZerothOrder(tangents=3, seed=0),
}


def _meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("make", WAYS.values(), ids=WAYS.keys())
def test_every_estimator_refuses_meta_parameters_in_one_sentence(make):
    model = _meta_mlp()
    with pytest.raises(fg.ConfigurationError, match="on the meta device .* materialise them"):
        make().estimate(model, lambda: model(torch.ones(2, 3)).sum())


def test_the_optimizer_refuses_them_when_built():
    with pytest.raises(fg.ConfigurationError, match="on the meta device"):
        fg.ForwardSGD(_meta_mlp(), lr=0.1)
