"""ForwardGradient with structured tangents (rank=r): unbiased against exact gradients, with the
derived second moment; the same estimate on both derivative paths; options, seeds, state."""

import math

import moments
import pytest
import torch
import torch.nn.functional as F
from derivatives import assert_same_derivatives
from torch import nn

import forwardgrad as fg
from forwardgrad import tangents as tg
from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators import make_estimator
from forwardgrad.jvp import stacked


def small_net(dtype=torch.float64):
    torch.manual_seed(0)  # matrices 5 × 4 and 3 × 5: structured up to rank 2
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def net_closure(model, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    return lambda: F.cross_entropy(model(x), y)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def exact_blocks(model, closure):
    fg.Backprop().estimate(model, closure)
    return [p.grad.detach().clone() for p in model.parameters()]


def draws(estimator, model, closure, count):
    samples = []
    for _ in range(count):
        estimator.estimate(model, closure)
        samples.append(flat_grad(model))
    return torch.stack(samples)


def single_estimates(model, closure, distribution, rank, count, seed=0):
    """``count`` independent one-tangent forward gradients g_k = d_k v_k, from one stacked
    evaluation with the ``count`` tangents (what ``ForwardGradient`` with K = 1 gives ``count``
    times; its fast path without the first-use check, which would run the general path
    ``count`` times): shape (count, n)."""
    params = list(model.parameters())
    source = tg.HeldTangents(params, count, distribution, seed, rank=rank)
    with torch.no_grad():
        _, derivatives, mode = stacked.stacked_derivatives(closure, source)
    assert mode.factored == 2 and not mode.forward_ad_calls
    tangents = torch.cat([v.reshape(count, -1) for v in source.dense()], dim=1)
    return derivatives.reshape(count, 1) * tangents


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
@pytest.mark.parametrize("rank", [1, 2])
def test_structured_forward_gradient_is_unbiased(distribution, rank):
    # Against autograd's gradient; each coordinate within 5 standard errors, the standard
    # deviation from the derived per-coordinate variance.
    model = small_net()
    closure = net_closure(model)
    blocks = exact_blocks(model, closure)
    exact = torch.cat([b.reshape(-1) for b in blocks])
    samples = single_estimates(model, closure, distribution, rank, 3000)
    sd = (moments.coordinate_variance(blocks, distribution, rank) / len(samples)).sqrt()
    assert ((samples.mean(0) - exact).abs() <= 5 * sd + 1e-12).all()


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
@pytest.mark.parametrize("rank", [1, 2])
def test_structured_second_moment(distribution, rank):
    # E‖g‖² = n‖∇f‖² + Σ_b c_b ‖G_b‖²; 5 standard errors of the sample mean of ‖g‖².
    model = small_net()
    closure = net_closure(model)
    blocks = exact_blocks(model, closure)
    norms = single_estimates(model, closure, distribution, rank, 3000, seed=2).pow(2).sum(1)
    expected = moments.second_moment(blocks, distribution, rank)
    assert abs(norms.mean() - expected) <= 5 * norms.std() / math.sqrt(len(norms))


def test_k_structured_tangents_divide_the_variance_by_k():
    # E‖g − ∇f‖² = (E‖g₁‖² − ‖∇f‖²) / K for ForwardGradient's mean of K structured tangents.
    model = small_net()
    closure = net_closure(model)
    blocks = exact_blocks(model, closure)
    exact = torch.cat([b.reshape(-1) for b in blocks])
    one = moments.second_moment(blocks, "normal", 1) - exact.pow(2).sum()
    errors = draws(fg.ForwardGradient(4, seed=3, rank=1), model, closure, 300)
    errors = errors.sub(exact).pow(2).sum(1)
    assert abs(errors.mean() - one / 4) <= 5 * errors.std() / math.sqrt(len(errors))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize(("distribution", "rank"), [("normal", 1), ("rademacher", 2)])
def test_fast_and_general_paths_agree(count, distribution, rank):
    torch.manual_seed(0)
    model = SmallCNN()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 3, (5,), generator=g)

    def closure():
        return F.cross_entropy(model(x), y)

    assert_same_derivatives(model, closure, count, distribution, rank=rank)
    estimates = []
    for fast in (True, False):
        estimator = fg.ForwardGradient(count, distribution, seed=7, fast=fast, rank=rank)
        estimator.estimate(model, closure)
        assert estimator.last_path == ("fast" if fast else "general")
        estimates.append(flat_grad(model).clone())
    torch.testing.assert_close(estimates[0], estimates[1], rtol=1e-5, atol=1e-6)


def test_same_seed_same_estimates_and_state_dict_resumes():
    model = small_net()
    closure = net_closure(model)
    a = fg.ForwardGradient(2, "rademacher", seed=4, rank=1)
    b = fg.ForwardGradient(2, "rademacher", seed=4, rank=1)
    first = draws(a, model, closure, 2)
    assert torch.equal(first, draws(b, model, closure, 2))
    assert not torch.equal(first[0], first[1])
    state = a.state_dict()
    expected = draws(a, model, closure, 1)
    resumed = fg.ForwardGradient(2, "rademacher", seed=99, rank=1)
    resumed.load_state_dict(state)
    assert torch.equal(draws(resumed, model, closure, 1), expected)
    dense = draws(fg.ForwardGradient(2, "rademacher", seed=4), model, closure, 1)
    assert not torch.equal(dense[0], first[0])  # rank changes the law


def test_a_rank_no_smaller_than_every_matrix_gives_the_dense_estimate():
    # Every matrix here has a side <= 4: all keep their dense tangents, drawn from the same
    # streams as without a rank.
    model = small_net()
    closure = net_closure(model)
    wide = draws(fg.ForwardGradient(2, seed=5, rank=4), model, closure, 1)
    assert torch.equal(wide, draws(fg.ForwardGradient(2, seed=5), model, closure, 1))


def test_make_estimator_passes_the_rank():
    assert "rank" in fg.ForwardGradient.options
    estimator = make_estimator("forward", tangents=2, rank=1, seed=0)
    assert estimator.rank == 1
    assert estimator.describe() == "forward (K=2, normal, mean, rank 1)"
    assert make_estimator("forward").describe() == "forward (K=1, normal, mean)"
    make_estimator("backprop", rank=1)  # an option it does not take is ignored


BAD_RANKS = [0, -2, 1.5, True, "1"]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        *[({"rank": bad}, "rank must be None") for bad in BAD_RANKS],
        ({"rank": 1, "distribution": "orthogonal", "tangents": 2}, "orthogonal"),
        ({"rank": 1, "combine": "projection"}, "combine='mean'"),
    ],
)
def test_bad_settings_are_one_clear_error(options, words):
    with pytest.raises(ConfigurationError, match=words):
        fg.ForwardGradient(**options)


@pytest.mark.parametrize("bad", BAD_RANKS)
def test_forward_sgd_refuses_a_bad_rank(bad):
    with pytest.raises(ConfigurationError, match="rank must be None"):
        fg.ForwardSGD(small_net(), lr=0.1, rank=bad)


def test_functional_form_takes_the_rank():
    model = small_net()
    params = {name: p.detach() for name, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)

    def fn(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    generator = torch.Generator().manual_seed(3)
    value, grads = fg.forward_grad(fn, params, 1, "normal", "mean", generator, rank=1)
    assert value.item() == pytest.approx(fn(params).item())
    generator = torch.Generator().manual_seed(3)
    tangents = fg.sample_tangents(list(params.values()), 1, "normal", generator, rank=1)
    derivative = None
    for grad, tangent in zip(grads.values(), tangents):
        ratio = grad / tangent[0]  # g = d·v, one d for every coordinate
        derivative = ratio.reshape(-1)[0] if derivative is None else derivative
        assert torch.allclose(ratio, derivative.expand_as(ratio))
    assert torch.linalg.matrix_rank(tangents[0][0]) == 1
    assert torch.linalg.matrix_rank(tangents[2][0]) == 1
