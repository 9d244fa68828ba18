"""Tangent samplers and combiners: moments, orthogonality, projection, determinism."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forwardgrad import tangents as tg

SHAPES = [(2, 3), (4,), (1, 1, 2)]  # n = 12 parameters over three tensors


def _like(shapes=SHAPES, dtype=torch.float64):
    return [torch.zeros(s, dtype=dtype) for s in shapes]


def _flat(tangents):
    count = tangents[0].shape[0]
    return torch.cat([v.reshape(count, -1) for v in tangents], dim=1)


def _draws(distribution, count, draws, seed):
    """``draws`` independent sets of ``count`` tangents, flattened: shape (draws, count, n)."""
    generator = torch.Generator().manual_seed(seed)
    if distribution == "orthogonal":  # directions within a set are dependent: one QR per set
        sets = [
            _flat(tg.sample_tangents(_like(), count, distribution, generator)) for _ in range(draws)
        ]
        return torch.stack(sets)
    flat = _flat(tg.sample_tangents(_like(), count * draws, distribution, generator))
    return flat.reshape(draws, count, -1)


@pytest.mark.parametrize("distribution", tg.DISTRIBUTIONS)
def test_second_moment_is_identity(distribution):
    # E[v vᵀ] = I. Each entry of the sample mean of v vᵀ over N draws has standard deviation at
    # most sqrt(E[v_i² v_j²] / N) <= sqrt(3 / N) (Gaussian fourth moment; the others are smaller
    # or equal), so 5 of those bounds every one of the 144 entries with a margin.
    count = 4 if distribution == "orthogonal" else 1
    draws = 1_000 if distribution == "orthogonal" else 20_000
    v = _draws(distribution, count, draws, seed=0).reshape(count * draws, -1)
    moment = v.T @ v / v.shape[0]
    tolerance = 5 * math.sqrt(3 / v.shape[0])
    assert torch.allclose(moment, torch.eye(12, dtype=v.dtype), atol=tolerance)


def test_rademacher_values_are_signs():
    v = _flat(tg.sample_tangents(_like(), 8, "rademacher", torch.Generator().manual_seed(1)))
    assert set(v.unique().tolist()) == {-1.0, 1.0}


def test_orthogonal_directions_are_orthogonal_with_norm_sqrt_n():
    v = _flat(tg.sample_tangents(_like(), 5, "orthogonal", torch.Generator().manual_seed(2)))
    assert torch.allclose(v @ v.T, 12 * torch.eye(5, dtype=v.dtype), atol=1e-9)


def test_orthogonal_needs_at_most_n_tangents():
    with pytest.raises(ValueError, match="tangents <= the number of parameters"):
        tg.sample_tangents(_like(), 13, "orthogonal")


@pytest.mark.parametrize("distribution", tg.DISTRIBUTIONS)
def test_same_seed_same_tangents(distribution):
    a = tg.sample_tangents(_like(), 3, distribution, torch.Generator().manual_seed(7))
    b = tg.sample_tangents(_like(), 3, distribution, torch.Generator().manual_seed(7))
    c = tg.sample_tangents(_like(), 3, distribution, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_tangents_take_dtype_and_shape_of_params():
    params = [torch.zeros(3, 2, dtype=torch.float32), torch.zeros(5, dtype=torch.float64)]
    for distribution in tg.DISTRIBUTIONS:
        out = tg.sample_tangents(params, 2, distribution)
        assert [v.shape for v in out] == [(2, 3, 2), (2, 5)]
        assert [v.dtype for v in out] == [torch.float32, torch.float64]


@pytest.mark.parametrize("bad", ["gaussian", "", None, 3])
def test_unknown_distribution(bad):
    with pytest.raises(ValueError, match="unknown tangent distribution"):
        tg.sample_tangents(_like(), 1, bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_count(bad):
    with pytest.raises(ValueError, match="positive integer"):
        tg.sample_tangents(_like(), bad)


def test_unknown_combiner():
    with pytest.raises(ValueError, match="unknown combine"):
        tg.combine(torch.ones(1), [torch.ones(1, 2)], "median")


def test_mean_combiner_is_average_of_forward_gradients():
    tangents = tg.sample_tangents(_like(), 3, "normal", torch.Generator().manual_seed(3))
    d = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    out = _flat([g.unsqueeze(0) for g in tg.combine(d, tangents, "mean")])[0]
    expected = (d[:, None] * _flat(tangents)).mean(0)
    assert torch.allclose(out, expected)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), distribution=st.sampled_from(["normal", "orthogonal"]))
def test_projection_with_n_tangents_is_exact(seed, distribution):
    generator = torch.Generator().manual_seed(seed)
    gradient = torch.randn(12, dtype=torch.float64, generator=generator)
    tangents = tg.sample_tangents(_like(), 12, distribution, generator)
    d = _flat(tangents) @ gradient
    out = _flat([g.unsqueeze(0) for g in tg.combine(d, tangents, "projection")])[0]
    assert torch.allclose(out, gradient, atol=1e-8)


@pytest.mark.parametrize("distribution", tg.DISTRIBUTIONS)
def test_projection_is_unbiased(distribution):
    # E[(n / rank B) P] = I. The scaled projection of a unit gradient has per-coordinate
    # variance at most (n/K)² ‖g‖² (P is a contraction), which bounds the tolerance.
    gradient = torch.zeros(12, dtype=torch.float64)
    gradient[0], gradient[5] = 0.6, -0.8
    count = 3
    draws = 1_000 if distribution == "orthogonal" else 4_000
    b = _draws(distribution, count, draws, seed=11)  # (draws, K, n)
    total = torch.zeros(12, dtype=torch.float64)
    for tangents in b:
        d = tangents @ gradient
        total += tg.combine(d, [tangents], "projection")[0]
    tolerance = 5 * (12 / count) / math.sqrt(draws)
    assert torch.allclose(total / draws, gradient, atol=tolerance)


def test_projection_handles_rank_deficient_tangents():
    # Two equal Rademacher-like directions: rank 1, the scaling uses n / rank = 12.
    v = torch.ones(12, dtype=torch.float64)
    tangents = [torch.stack([v, v])]
    gradient = torch.arange(12, dtype=torch.float64)
    d = tangents[0] @ gradient
    out = tg.combine(d, tangents, "projection")[0]
    expected = 12 * (v @ gradient) / (v @ v) * v
    assert torch.allclose(out, expected)
