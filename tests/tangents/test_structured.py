"""Structured tangents V = (1/√r) Σ_j a_j b_jᵀ: their law, their moments, and the sources' use of
their factors (the update and .grad written without forming a tangent)."""

import math

import moments
import numpy as np
import pytest
import torch

from forwardgrad import tangents as tg
from forwardgrad.errors import ConfigurationError
from forwardgrad.tangents import structured

# A matrix, a vector and a kernel viewed as 4 × 6: n = 20 + 3 + 24 = 47 values.
SHAPES = [(5, 4), (3,), (4, 2, 3)]


def _like(shapes=SHAPES):
    return [torch.zeros(s, dtype=torch.float64) for s in shapes]


def _draws(distribution, rank, draws, seed):
    """``draws`` independent tangents over SHAPES, flattened: shape (draws, n)."""
    generator = torch.Generator().manual_seed(seed)
    v = tg.sample_tangents(_like(), draws, distribution, generator, rank=rank)
    return torch.cat([t.reshape(draws, -1) for t in v], dim=1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1", [1]])
def test_bad_rank_is_one_clear_error(bad):
    with pytest.raises(ConfigurationError, match="rank must be None .* or a positive integer"):
        tg.check_rank(bad)


def test_rank_takes_none_and_integers():
    assert tg.check_rank(None) is None
    assert tg.check_rank(3) == 3
    assert tg.check_rank(np.int64(2)) == 2


@pytest.mark.parametrize(
    ("distribution", "combine", "words"),
    [("orthogonal", "mean", "orthogonal directions couple"), ("normal", "projection", "biased")],
)
def test_structured_tangents_refuse_what_they_cannot_take(distribution, combine, words):
    with pytest.raises(ConfigurationError, match=words):
        tg.check_structured(1, distribution, combine)
    assert tg.check_structured(None, distribution, combine) is None


def test_which_parameters_are_structured():
    assert tg.is_structured(torch.zeros(5, 4), 1)
    assert tg.is_structured(torch.zeros(8, 3, 3, 3), 2)  # a kernel: 8 × 27
    assert not tg.is_structured(torch.zeros(5, 4), None)
    assert not tg.is_structured(torch.zeros(7), 1)  # vectors stay dense
    # min(m, n) <= r: a rank-r tangent would be full rank and cost more than the dense one.
    assert not tg.is_structured(torch.zeros(5, 4), 4)
    assert not tg.is_structured(torch.zeros(1, 1, 768), 1)  # a class token: 1 × 768


def test_a_matrix_no_wider_than_the_rank_keeps_the_dense_stream():
    like = torch.zeros(3, 6)
    dense = tg.parameter_tangents(like, 2, "normal", seed=4, index=1)
    assert torch.equal(structured.structured_tangents(like, 2, "normal", 4, 1, rank=3), dense)


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_factors_are_a_function_of_seed_index_and_tangent(distribution):
    like = torch.zeros(6, 5)
    a, b = tg.parameter_factors(like, 3, distribution, seed=9, index=2, rank=2)
    assert a.shape == (3, 6, 2) and b.shape == (3, 5, 2)
    again = tg.parameter_factors(like, 1, distribution, seed=9, index=2, rank=2)
    assert torch.equal(again[0][0], a[0]) and torch.equal(again[1][0], b[0])  # K does not matter
    other = tg.parameter_factors(like, 1, distribution, seed=9, index=3, rank=2)
    assert not torch.equal(other[0][0], a[0])
    assert not torch.equal(a[0], a[1])
    if distribution == "rademacher":  # a/√r and b: signs
        assert torch.allclose((a * math.sqrt(2)).abs(), torch.ones(()))
        assert set(b.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
@pytest.mark.parametrize("rank", [1, 2])
def test_second_moment_of_the_tangent_is_identity(distribution, rank):
    # E[vec V vec Vᵀ] = I. Entry (i, j) of the sample mean of v vᵀ over N draws has standard
    # deviation sqrt(Var(v_i v_j) / N) (finite: E[V_pq⁴] = (μ₄² + 3(r − 1))/r <= 9); 5 sample
    # standard errors bound each of the 47² entries.
    v = _draws(distribution, rank, 10_000, seed=0)
    products = v[:, :, None] * v[:, None, :]
    error = products.std(0) / math.sqrt(v.shape[0])
    identity = torch.eye(v.shape[1], dtype=v.dtype)
    assert ((products.mean(0) - identity).abs() <= 5 * error + 1e-12).all()


def _gradient(seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=torch.float64, generator=generator) for s in SHAPES]


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
@pytest.mark.parametrize("rank", [1, 2])
def test_second_moment_of_the_forward_gradient(distribution, rank):
    # E‖(∇f·v) v‖² = n‖∇f‖² + Σ_b c_b ‖G_b‖², and Var(g_i) per coordinate as derived. The
    # tolerances are 5 standard errors of each sample mean, from its sample variance.
    gradient = _gradient()
    flat = torch.cat([g.reshape(-1) for g in gradient])
    v = _draws(distribution, rank, 20_000, seed=1)
    g = (v @ flat)[:, None] * v
    norms = g.pow(2).sum(1)
    expected = moments.second_moment(gradient, distribution, rank)
    assert abs(norms.mean() - expected) <= 5 * norms.std() / math.sqrt(len(norms))
    squares = (g - flat).pow(2)
    variance = moments.coordinate_variance(gradient, distribution, rank)
    error = squares.std(0) / math.sqrt(len(squares))
    assert ((squares.mean(0) - variance).abs() <= 5 * error).all()


# --- Sources: the update and .grad from the factors ------------------------------------------


def _params():
    torch.manual_seed(0)
    return [torch.randn(s) for s in [(6, 5), (4,), (3, 2, 2, 2)]]


@pytest.mark.parametrize(("count", "rank"), [(1, 1), (3, 2)])
def test_in_place_update_equals_the_dense_update_with_the_formed_tangent(count, rank):
    params = _params()
    source = tg.DrawnTangents(params, count, "normal", seed=5, rank=rank)
    coefficients = [0.5, -1.0, 2.0][:count]
    for i, p in enumerate(params):
        whole = structured.structured_tangents(p, count, "normal", 5, i, rank)
        expected = p - 0.1 * torch.tensordot(torch.tensor(coefficients), whole, dims=1)
        out = p.clone()
        source.accumulate(i, out, coefficients, alpha=-0.1)
        torch.testing.assert_close(out, expected)
        strided = p.clone().T.contiguous().T if p.dim() == 2 else None  # not contiguous
        if strided is not None:
            source.accumulate(i, strided, coefficients, alpha=-0.1)
            torch.testing.assert_close(strided, expected)


def test_update_and_grads_never_form_a_structured_tangent(monkeypatch):
    params = _params()

    def refuse(*args, **kwargs):
        raise AssertionError("a structured tangent was formed whole")

    monkeypatch.setattr(structured, "materialise", refuse)
    drawn = tg.DrawnTangents(params, 2, "rademacher", seed=1, rank=1)
    for i, p in enumerate(params):
        drawn.accumulate(i, p, [1.0, 2.0])
    assert drawn.row_blocks(0) is None  # the rules take the factors
    tg.HeldTangents(params, 2, "rademacher", seed=1, rank=1).write_grads(torch.ones(2))
    tg.GradTangents(params, "rademacher", seed=1, rank=1).write_grads(torch.ones(1))


@pytest.mark.parametrize("count", [1, 3])
def test_grads_equal_the_combination_of_the_formed_tangents(count):
    params = _params()
    coefficients = torch.tensor([0.5, -1.0, 2.0][:count], dtype=torch.float64)
    if count == 1:
        source = tg.GradTangents(params, "normal", seed=2, rank=1)
    else:
        source = tg.HeldTangents(params, count, "normal", seed=2, rank=1)
    source(0)  # one tangent formed (as the general path does), the others not
    source.write_grads(coefficients)
    for i, p in enumerate(params):
        whole = structured.structured_tangents(p, count, "normal", 2, i, 1)
        expected = torch.tensordot(coefficients.float(), whole, dims=1)
        torch.testing.assert_close(p.grad, expected)


@pytest.mark.parametrize("source_type", ["held", "drawn", "grad"])
def test_every_streamed_source_gives_the_same_tangents(source_type):
    params = _params()
    made = {
        "held": lambda: tg.HeldTangents(params, 1, "normal", seed=8, rank=2),
        "drawn": lambda: tg.DrawnTangents(params, 1, "normal", seed=8, rank=2),
        "grad": lambda: tg.GradTangents(params, "normal", seed=8, rank=2),
    }[source_type]()
    for i, p in enumerate(params):
        expected = structured.structured_tangents(p, 1, "normal", 8, i, 2)
        assert torch.equal(made(i), expected)
        assert (made.factors(i) is None) == (p.dim() < 2)
