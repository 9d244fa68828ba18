"""Every estimator against exact autograd gradients: bias, variance, protocol and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardgrad as fg
from forwardgrad.estimators import EstimatorError


class Quadratic(nn.Module):
    """f(θ) = ½ θᵀAθ + bᵀθ over two parameter tensors; central differences are exact on it."""

    def __init__(self, n=12, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.register_buffer("a", m @ m.T / n + torch.eye(n, dtype=torch.float64))
        self.register_buffer("b", torch.randn(n, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(n // 2, generator=g, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(n - n // 2, generator=g, dtype=torch.float64))

    def forward(self):
        theta = torch.cat([self.w, self.v])
        return 0.5 * theta @ self.a @ theta + self.b @ theta


def small_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def net_closure(model, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    return lambda: F.cross_entropy(model(x), y)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def exact_grad(model, closure):
    fg.Backprop().estimate(model, closure)
    return flat_grad(model).clone()


def draws(estimator, model, closure, count):
    return torch.stack(
        [(estimator.estimate(model, closure), flat_grad(model))[1] for _ in range(count)]
    )


# --- Bias and variance ---------------------------------------------------------------------


def per_coordinate_variance(distribution, gradient):
    # g = (a·v) v: Var(g_i) = ‖a‖² + a_i² for Gaussian v, ‖a‖² − a_i² for Rademacher signs.
    norm2 = gradient.pow(2).sum()
    return norm2 + gradient.pow(2) if distribution == "normal" else norm2 - gradient.pow(2)


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_forward_gradient_is_unbiased(distribution):
    model = small_net()
    closure = net_closure(model)
    exact = exact_grad(model, closure)
    samples = draws(fg.ForwardGradient(distribution=distribution, seed=0), model, closure, 1000)
    sd = (per_coordinate_variance(distribution, exact) / len(samples)).sqrt()
    assert ((samples.mean(0) - exact).abs() <= 5 * sd + 1e-12).all()


@pytest.mark.parametrize("combine", ["mean", "projection"])
def test_orthogonal_tangents_are_unbiased(combine):
    # Both combiners give (n/K) P ∇f for orthogonal tangents; P is a contraction, so each
    # coordinate's standard deviation is at most (n/K)‖∇f‖.
    model = small_net()
    closure = net_closure(model)
    exact = exact_grad(model, closure)
    n, k = exact.numel(), 8
    samples = draws(fg.ForwardGradient(k, "orthogonal", combine, seed=1), model, closure, 300)
    sd = (n / k) * exact.norm() / math.sqrt(len(samples))
    assert ((samples.mean(0) - exact).abs() <= 5 * sd).all()


@pytest.mark.parametrize(("distribution", "factor"), [("normal", 2), ("rademacher", 0)])
def test_second_moment_identity(distribution, factor):
    # E‖g‖² = (n + 2)‖∇f‖² (Gaussian) and n‖∇f‖² (Rademacher); the tolerance is 5 standard
    # errors of the sample mean of ‖g‖².
    model = Quadratic()
    closure = model
    exact = exact_grad(model, closure)
    n = exact.numel()
    norms = draws(fg.ForwardGradient(distribution=distribution, seed=2), model, closure, 2000)
    norms = norms.pow(2).sum(1)
    expected = (n + factor) * exact.pow(2).sum()
    assert abs(norms.mean() - expected) <= 5 * norms.std() / math.sqrt(len(norms))


def test_k_tangents_divide_the_variance_by_k():
    # E‖g − ∇f‖² = (n + 1)‖∇f‖² / K for the mean of K Gaussian forward gradients.
    model = Quadratic()
    exact = exact_grad(model, model)
    n = exact.numel()
    for k in (1, 4):
        errors = draws(fg.ForwardGradient(k, seed=3), model, model, 800).sub(exact).pow(2).sum(1)
        expected = (n + 1) * exact.pow(2).sum() / k
        assert abs(errors.mean() - expected) <= 5 * errors.std() / math.sqrt(len(errors))


@pytest.mark.parametrize("distribution", ["normal", "orthogonal", "rademacher"])
def test_projection_with_k_equal_n_is_the_exact_gradient(distribution):
    model = small_net()
    closure = net_closure(model)
    exact = exact_grad(model, closure)
    n = exact.numel()
    # Rademacher sign matrices of size n are singular with small probability; a generous K
    # makes B full rank, and the projection is then the identity.
    k = n if distribution != "rademacher" else 2 * n
    fg.ForwardGradient(k, distribution, "projection", seed=4).estimate(model, closure)
    assert torch.allclose(flat_grad(model), exact, rtol=1e-7, atol=1e-9)


def test_zeroth_order_is_exact_on_average_for_a_quadratic():
    # Central differences are exact on quadratics, so SPSA has the forward gradient's variance.
    model = Quadratic()
    exact = exact_grad(model, model)
    samples = draws(fg.ZerothOrder(eps=1e-2, seed=5), model, model, 1000)
    sd = (per_coordinate_variance("normal", exact) / len(samples)).sqrt()
    assert ((samples.mean(0) - exact).abs() <= 5 * sd + 1e-9).all()


def test_zeroth_order_bias_shrinks_as_eps_squared():
    # Same seed, same direction z: the SPSA directional derivative differs from ∇f·z by
    # f'''·ε²/6 + O(ε⁴), so halving ε divides the error by 4.
    def fn(p):
        return torch.sin(p["x"]).sum() + torch.exp(0.5 * p["x"]).sum()

    params = {"x": torch.linspace(-1, 1, 7, dtype=torch.float64)}
    exact = torch.cos(params["x"]) + 0.5 * torch.exp(0.5 * params["x"])
    errors = []
    for eps in (0.1, 0.05, 0.025):
        generator = torch.Generator().manual_seed(6)
        _, grads = fg.zeroth_order_grad(fn, params, eps=eps, generator=generator)
        z = fg.sample_tangents([params["x"]], 1, "normal", torch.Generator().manual_seed(6))[0][0]
        errors.append(((grads["x"] - (exact @ z) * z).norm()).item())
    assert 3.8 < errors[0] / errors[1] < 4.2
    assert 3.8 < errors[1] / errors[2] < 4.2


def test_zeroth_order_restores_parameters_to_rounding():
    model = small_net(torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    fg.ZerothOrder(tangents=3, eps=1e-3, seed=0).estimate(
        model, net_closure(model, dtype=torch.float32)
    )
    for p, q in zip(model.parameters(), before):
        assert torch.allclose(p, q, rtol=0, atol=8 * torch.finfo(p.dtype).eps * q.abs().max())


def test_backprop_matches_autograd():
    model = small_net()
    closure = net_closure(model)
    loss = closure()
    expected = torch.autograd.grad(loss, list(model.parameters()))
    fg.Backprop().estimate(model, closure)
    for p, g in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, g)


def test_functional_forms_match_the_module_forms():
    model = Quadratic()
    params = dict(model.named_parameters())

    def fn(p):
        return torch.func.functional_call(model, p, ())

    value, grads = fg.backprop_grad(fn, params)
    assert torch.allclose(torch.cat([grads["w"], grads["v"]]), exact_grad(model, model))
    for k in (1, 12):
        value, grads = fg.forward_grad(fn, params, k, "normal", "projection", torch.Generator())
        assert value.item() == pytest.approx(model().item())
    assert torch.allclose(torch.cat([grads["w"], grads["v"]]), exact_grad(model, model))


# --- No backward pass --------------------------------------------------------------------


class _NoEngine:
    def run_backward(self, *args, **kwargs):
        raise AssertionError("a backward pass ran")


def test_forward_gradient_runs_no_backward_pass(monkeypatch):
    from torch.autograd.variable import Variable

    model = small_net()
    closure = net_closure(model)
    monkeypatch.setattr(Variable, "_execution_engine", _NoEngine())
    # The guard is live: backprop trips it.
    with pytest.raises(AssertionError, match="a backward pass ran"):
        fg.Backprop().estimate(model, closure)
    for k in (1, 3):
        loss = fg.ForwardGradient(k, seed=0).estimate(model, closure)
        assert loss.grad_fn is None
        assert all(p.grad.grad_fn is None for p in model.parameters())


# --- Protocol: determinism, state, .grad -------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda s: fg.ForwardGradient(seed=s),
        lambda s: fg.ForwardGradient(3, "rademacher", seed=s),
        lambda s: fg.ForwardGradient(3, "orthogonal", "projection", seed=s),
        lambda s: fg.ZerothOrder(2, seed=s),
    ],
)
def test_same_seed_same_estimates_and_fresh_draws(make):
    # Fresh models: zeroth-order restores parameters only to rounding.
    model = small_net(torch.float32)
    closure = net_closure(model, dtype=torch.float32)
    a, b = make(7), make(7)
    first = [(a.estimate(model, closure), flat_grad(model).clone())[1] for _ in range(2)]
    model = small_net(torch.float32)
    closure = net_closure(model, dtype=torch.float32)
    second = [(b.estimate(model, closure), flat_grad(model).clone())[1] for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0], first[1])
    # state_dict round trip resumes the stream exactly
    state = a.state_dict()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    a.estimate(model, closure)
    expected = flat_grad(model).clone()
    model.load_state_dict(snapshot)
    c = make(123)
    c.load_state_dict(state)
    c.estimate(model, closure)
    assert torch.equal(flat_grad(model), expected)


def test_unseeded_estimators_follow_torch_manual_seed():
    model = small_net(torch.float32)
    closure = net_closure(model, dtype=torch.float32)
    torch.manual_seed(3)
    fg.ForwardGradient().estimate(model, closure)
    first = flat_grad(model).clone()
    torch.manual_seed(3)
    fg.ForwardGradient().estimate(model, closure)
    assert torch.equal(first, flat_grad(model))


@pytest.mark.parametrize("name", fg.ESTIMATORS)
def test_grad_is_overwritten_and_the_model_left_as_it_was(name):
    model = small_net(torch.float32)
    closure = net_closure(model, dtype=torch.float32)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    estimator = fg.make_estimator(name, seed=0)
    estimator.estimate(model, closure)
    once = flat_grad(model).clone()
    with torch.no_grad():  # zeroth-order put θ back to within rounding: start from θ itself
        for p, q in zip(params, before):
            p.copy_(q)
            p.grad.fill_(1e6)
    estimator = fg.make_estimator(name, seed=0)
    estimator.estimate(model, closure)
    assert torch.allclose(flat_grad(model), once)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(type(p) is nn.Parameter for p in model.parameters())
    tol = 1e-6 if name == "zeroth-order" else 0
    assert all(torch.allclose(p, q, rtol=0, atol=tol) for p, q in zip(params, before))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", fg.ESTIMATORS)
def test_any_torch_optimizer_applies_the_step(name):
    model = small_net(torch.float32)
    closure = net_closure(model, dtype=torch.float32)
    estimator = fg.make_estimator(name, tangents=4, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = closure().item()
    for _ in range(150):
        optimizer.zero_grad()
        estimator.estimate(model, closure)
        optimizer.step()
    assert closure().item() < 0.9 * first


@pytest.mark.parametrize("name", fg.ESTIMATORS)
def test_frozen_parameters_are_not_perturbed_and_keep_their_grad(name):
    model = small_net(torch.float32)
    closure = net_closure(model, dtype=torch.float32)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    frozen.grad = torch.full_like(frozen, 7.0)
    before = frozen.detach().clone()
    fg.make_estimator(name, seed=0).estimate(model, closure)
    assert torch.equal(frozen, before)
    assert torch.equal(frozen.grad, torch.full_like(frozen, 7.0))
    assert model[0].bias.grad is not None


@pytest.mark.parametrize("name", fg.ESTIMATORS)
def test_model_is_restored_when_the_closure_raises(name):
    model = small_net(torch.float32)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    calls = []

    def closure():
        calls.append(1)
        model(torch.randn(2, 4))
        raise KeyError("boom")

    with pytest.raises(KeyError):
        fg.make_estimator(name, tangents=2, seed=0).estimate(model, closure)
    assert calls
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in params)


# --- Bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", fg.ESTIMATORS)
def test_bad_losses(name):
    model = small_net(torch.float32)
    x = torch.randn(4, 4)
    cases = [
        (lambda: model(x), ValueError, "scalar"),
        (lambda: 3.0, TypeError, "not a tensor"),
        (lambda: model(x).sum() * float("nan"), ValueError, "nan"),
        (lambda: model(x).sum() + float("inf"), ValueError, "inf"),
    ]
    for closure, error, words in cases:
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(error, match=words):
            fg.make_estimator(name, seed=0).estimate(model, closure)
        # zeroth-order puts its in-place perturbation back to within rounding
        tol = 1e-6 if name == "zeroth-order" else 0
        assert all(
            torch.allclose(p, q, rtol=0, atol=tol) for p, q in zip(model.parameters(), before)
        )


def test_infinite_directional_derivative():
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    with pytest.raises(EstimatorError, match="directional derivative"):
        fg.ForwardGradient(seed=0).estimate(
            model, lambda: model(torch.ones(1, 3)).abs().sqrt().sum()
        )


@pytest.mark.parametrize("name", fg.ESTIMATORS)
def test_closure_that_calls_backward(name):
    model = small_net(torch.float32)
    x = torch.randn(4, 4)

    def closure():
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="called backward"):
        fg.make_estimator(name, seed=0).estimate(model, closure)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: fg.ForwardGradient(tangents=0), "positive integer"),
        (lambda: fg.ForwardGradient(tangents=-2), "positive integer"),
        (lambda: fg.ForwardGradient(distribution="uniform"), "unknown tangent distribution"),
        (lambda: fg.ForwardGradient(combine="sum"), "unknown combine"),
        (lambda: fg.ZerothOrder(eps=0), "eps must be a positive"),
        (lambda: fg.ZerothOrder(eps=-1e-3), "eps must be a positive"),
        (lambda: fg.ZerothOrder(eps=float("nan")), "eps must be a positive"),
        (lambda: fg.ZerothOrder(tangents=0), "positive integer"),
        (lambda: fg.make_estimator("adjoint"), "unknown estimator"),
    ],
)
def test_bad_arguments(make, words):
    with pytest.raises(ValueError, match=words):
        make()


@pytest.mark.parametrize("name", fg.ESTIMATORS)
def test_model_without_trainable_parameters(name):
    model = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        fg.make_estimator(name).estimate(model, lambda: model(torch.ones(1, 2)).sum())


# --- Regressions: cases where a fast rule could silently go wrong ------------------------


def _projection_equals_backprop(model, closure):
    exact = exact_grad(model, closure)
    n = exact.numel()
    fg.ForwardGradient(n, "normal", "projection", seed=0).estimate(model, closure)
    return torch.allclose(flat_grad(model), exact, rtol=1e-6, atol=1e-9)


def test_tangent_shared_by_two_tensors_is_not_overwritten():
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()
    x = torch.randn(3, 2, dtype=torch.float64)

    def closure():
        h = model(x)
        return (torch.relu(h - 0.5) + h).pow(2).sum()

    assert _projection_equals_backprop(model, closure)
    for k in (1, 3):  # and the plain estimate is unbiased-exact in direction for K = 1, 3
        fg.ForwardGradient(k, seed=0).estimate(model, closure)
        assert flat_grad(model).abs().sum() > 0


def test_torchscript_inside_the_closure_is_differentiated():
    @torch.jit.script
    def activation(h):
        return torch.tanh(h) * 2.0

    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    assert _projection_equals_backprop(model, lambda: activation(model(x)).pow(2).sum())


def test_parameters_captured_outside_the_closure_carry_tangents():
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    params = list(model.parameters())

    def closure():  # .abs() has no fast rule, so this runs on the general path
        return model(x).abs().mean() + 0.5 * sum(p.pow(2).sum() for p in params)

    assert _projection_equals_backprop(model, closure)
    exact = exact_grad(model, closure)
    fg.ForwardGradient(6, "orthogonal", "projection", seed=1).estimate(model, closure)
    assert torch.allclose(flat_grad(model), exact, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", fg.ESTIMATORS)
def test_parameters_on_the_meta_device_get_one_clear_error(name):
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(fg.ConfigurationError, match="meta device"):
        fg.make_estimator(name, seed=0).estimate(model, lambda: model(torch.ones(1, 3)).sum())
