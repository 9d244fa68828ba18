"""Activity-perturbed forward gradients: exact per-example derivatives, each layer's own rule,
unbiased output gradients (statistical, tolerance from the variance), the variance that
perturbing every layer at once costs, the estimator protocol and bad input."""

import pytest
import torch
import torch.nn.functional as F
from exact import expected_output_gradients, output_gradients
from helpers import Doubling
from torch import nn

import forwardgrad as fg
from forwardgrad.estimators.local_rules import parameter_gradients

PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
BATCH = 6


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
    ).double()


def data(model):
    generator = torch.Generator().manual_seed(1)
    shape = (BATCH, 4) if isinstance(model[0], nn.Linear) else (BATCH, 1, 6, 6)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (BATCH,), generator=generator)


def per_example(model, x, y):
    return lambda: F.cross_entropy(model(x), y, reduction="none")


def layers(model):
    return [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]


# --------------------------------------------------------------------------- exact parts


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.Linear(4, 3), (5, 2, 4)),
        (nn.Conv1d(3, 4, 4, padding="same", bias=False), (2, 3, 9)),
        (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 7, 6)),
        (nn.Conv2d(3, 4, (3, 2), padding="same", dilation=2), (2, 3, 7, 6)),
        (nn.Conv2d(4, 4, 3, padding=2, padding_mode="reflect", stride=2, groups=2), (2, 4, 7, 6)),
        (nn.Conv3d(2, 3, 2, padding=1), (2, 2, 4, 4, 3)),
    ],
    ids=["linear", "conv1d-same", "conv2d", "conv2d-same-dilated", "conv2d-reflect", "conv3d"],
)
def test_each_layers_local_rule_is_its_exact_parameter_gradient(module, shape):
    torch.manual_seed(0)
    module = module.double()
    x = torch.randn(shape, dtype=torch.float64)
    z = module(x)
    g = torch.randn_like(z)
    expected = torch.autograd.grad(z, list(module.parameters()), g)
    found = parameter_gradients(module, x, g)
    assert [p for p, _ in found] == list(module.parameters())
    for (_, grad), reference in zip(found, expected):
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)


@PATHS
@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize(("count", "layerwise"), [(1, False), (3, False), (2, True)])
def test_output_gradients_are_the_exact_per_example_combination(fast, make, count, layerwise):
    # ĝ^l_n = (1/KB) Σ_k (Σ_j ∇_{z^j_n} ℓ_n · u^j_{k,n}) u^l_{k,n}, to rounding; layerwise, the
    # sum has the term j = l alone.
    model = make()
    x, y = data(model)
    estimator = fg.ActivityPerturbation(tangents=count, seed=3, layerwise=layerwise, fast=fast)
    loss, calls = estimator.output_gradients(model, per_example(model, x, y))
    assert estimator.last_path == ("fast" if fast else "general"), estimator.last_fallback
    assert [c.layer.slot for c in calls] == (
        list(range(len(calls))) if layerwise else [0] * len(calls)
    )
    exact = output_gradients(per_example(model, x, y), layers(model))
    expected = expected_output_gradients(
        exact, [c.u for c in calls], [None] * len(calls), alone=layerwise
    )
    assert [c.layer.module for c in calls] == layers(model)
    for call, reference in zip(calls, expected):
        torch.testing.assert_close(call.output_gradient, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss, per_example(model, x, y)().mean())


@pytest.mark.parametrize("make", [mlp, cnn])
def test_estimate_applies_each_layers_rule_to_its_output_gradient(make):
    model = make()
    x, y = data(model)
    _, calls = fg.ActivityPerturbation(seed=4).output_gradients(model, per_example(model, x, y))
    fg.ActivityPerturbation(seed=4).estimate(model, per_example(model, x, y))
    for call in calls:
        for p, grad in parameter_gradients(call.layer.module, call.x, call.output_gradient):
            torch.testing.assert_close(p.grad, grad, rtol=1e-12, atol=1e-12)


def test_both_paths_give_the_same_estimate():
    model = cnn()
    x, y = data(model)
    grads = []
    for fast in (True, False):
        estimator = fg.ActivityPerturbation(tangents=2, seed=7, fast=fast)
        estimator.estimate(model, per_example(model, x, y))
        assert estimator.last_path == ("fast" if fast else "general")
        assert estimator.last_fallback is None
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- statistics


def sampled_output_gradients(model, x, y, count, samples, layerwise=False):
    """``samples`` K-averaged estimates of every layer's ĝ, stacked: one ``(N, B, ...)`` each."""
    # The engine checks its fast path against the general path on first use with K > 1,
    # one evaluation per tangent: settle that with K = 2 before drawing thousands.
    fg.ActivityPerturbation(tangents=2, seed=0).output_gradients(model, per_example(model, x, y))
    estimator = fg.ActivityPerturbation(tangents=count, seed=11, layerwise=layerwise)
    draws = [estimator.output_gradients(model, per_example(model, x, y))[1] for _ in range(samples)]
    return [torch.stack([d[c].output_gradient for d in draws]) for c in range(len(draws[0]))]


@pytest.mark.parametrize("make", [mlp, cnn])
def test_output_gradients_are_unbiased_with_every_layer_perturbed_at_once(make):
    model = make()
    x, y = data(model)
    count, samples = 2048, 20
    estimates = sampled_output_gradients(model, x, y, count, samples)
    exact = output_gradients(per_example(model, x, y), layers(model))
    for estimate, e in zip(estimates, exact):
        g = e[0] / BATCH  # ∂L/∂z for the batch mean L
        mean = estimate.mean(0)
        spread = estimate.var(0).sum() / samples  # E‖mean − g‖² if unbiased
        assert (mean - g).pow(2).sum() < 3 * spread  # expectation: 1 × spread
        # ...and the test can fail: a bias of a quarter of ‖g‖ would exceed that bound.
        assert (3 * spread).sqrt() < 0.25 * g.norm()
        z = (mean - g) / (estimate.std(0) / samples**0.5 + 1e-300)
        assert z.abs().max() < 6


@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_perturbing_every_layer_at_once_costs_the_other_layers_noise(layerwise):
    # Gaussian u, K tangents: E‖ĝ^l_n − g^l_n‖² = [(D_l + 1)‖∇_l ℓ_n‖² + D_l Σ_{j≠l}‖∇_j ℓ_n‖²]
    # / (K B²); the second term is the price of one set of tangents for every layer, and
    # layerwise tangent slots (each layer its own K) remove it.
    model = mlp()
    x, y = data(model)
    count, samples = 64, 100
    estimates = sampled_output_gradients(model, x, y, count, samples, layerwise)
    exact = [e[0] for e in output_gradients(per_example(model, x, y), layers(model))]
    norms = torch.stack([e.pow(2).sum(1) for e in exact])  # (layers, B)
    for l, (estimate, e) in enumerate(zip(estimates, exact)):
        size = e.shape[1]
        errors = (estimate - e / BATCH).pow(2).sum(2).sum(1)  # one per sample
        others = norms.sum(0) - norms[l]
        shared = ((size + 1) * norms[l] + size * others).sum() / (count * BATCH**2)
        alone = ((size + 1) * norms[l]).sum() / (count * BATCH**2)
        tolerance = 5 * errors.std() / samples**0.5
        assert abs(errors.mean() - (alone if layerwise else shared)) < tolerance
        if l < 2:  # the output layer's gradient dwarfs the others' noise there
            assert abs(errors.mean() - (shared if layerwise else alone)) > tolerance


# --------------------------------------------------------------------------- protocol


def test_grad_is_overwritten_hooks_removed_and_estimates_reproducible():
    model = mlp()
    x, y = data(model)
    fg.ActivityPerturbation(seed=0).estimate(model, per_example(model, x, y))
    once = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad.fill_(1e6)
    before = [p.detach().clone() for p in model.parameters()]
    fg.ActivityPerturbation(seed=0).estimate(model, per_example(model, x, y))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), once))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(not m._forward_hooks for m in model.modules())


def test_frozen_layers_keep_their_grad_and_are_not_estimated():
    model = mlp()
    x, y = data(model)
    model[0].requires_grad_(False)
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    fg.ActivityPerturbation(seed=0).estimate(model, per_example(model, x, y))
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[2].weight.grad is not None


def test_the_model_is_restored_when_the_closure_raises():
    model = mlp()

    def closure():
        model(torch.randn(2, 4, dtype=torch.float64))
        raise KeyError("boom")

    with pytest.raises(KeyError):
        fg.ActivityPerturbation(seed=0).estimate(model, closure)
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_adam_trains_with_it():
    model = mlp()
    x, y = data(model)
    estimator = fg.ActivityPerturbation(tangents=2, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    first = per_example(model, x, y)().mean().item()
    for _ in range(100):
        estimator.estimate(model, per_example(model, x, y))
        optimizer.step()
    assert per_example(model, x, y)().mean().item() < 0.5 * first


def test_a_data_parallel_job_sums_the_loss_and_every_gradient():
    model = mlp()
    x, y = data(model)
    single = fg.ActivityPerturbation(seed=2)
    loss = single.estimate(model, per_example(model, x, y))
    grads = [p.grad.clone() for p in model.parameters()]
    ranked = fg.ActivityPerturbation(seed=2)
    ranked.reducer = Doubling()
    total = ranked.estimate(model, per_example(model, x, y))
    n = sum(p.numel() for p in model.parameters())
    assert ranked.reducer.sizes == [n + 1]
    assert ranked.bytes_per_step(model) == 8 * (n + 1)
    torch.testing.assert_close(total, 2 * loss)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, 2 * g)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("closure", "words"),
    [
        (lambda m, x, y: F.cross_entropy(m(x), y), r"shape \(\); expected one loss per example"),
        (lambda m, x, y: F.cross_entropy(m(x), y, reduction="none")[:4], "returned 4 losses"),
        (lambda m, x, y: m(x), "returned 3 losses per row"),  # 6 rows of 3 "examples"
        (lambda m, x, y: m(x)[None], r"shape \(1, 6, 3\)"),
    ],
    ids=["scalar", "too-few", "logits", "three-dims"],
)
def test_a_closure_of_the_wrong_shape(closure, words):
    model = mlp()
    x, y = data(model)
    with pytest.raises(fg.ConfigurationError, match=words):
        fg.ActivityPerturbation(seed=0).estimate(model, lambda: closure(model, x, y))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("modules", "words"),
    [
        (["5"], "'5', which is not a submodule of Sequential"),
        ([nn.Linear(2, 2)], "'Linear', which is not a submodule"),
        (["1"], "'1' is a Tanh; activity perturbation has a local gradient rule only"),
        (["0"], r"2.weight, 2.bias, 4.weight, 4.bias belong to none"),
    ],
    ids=["unknown-name", "foreign-module", "no-local-rule", "uncovered"],
)
def test_modules_that_cannot_be_perturbed(modules, words):
    model = mlp()
    x, y = data(model)
    with pytest.raises(fg.ConfigurationError, match=words):
        fg.ActivityPerturbation(seed=0, modules=modules).estimate(model, per_example(model, x, y))


@pytest.mark.parametrize("modules", ["0", [], [3]])
def test_modules_must_be_a_list_of_names(modules):
    with pytest.raises(fg.ConfigurationError, match="modules must be"):
        fg.ActivityPerturbation(modules=modules)


def test_chosen_modules_by_name_or_reference():
    model = mlp()
    x, y = data(model)
    model[0].requires_grad_(False)
    estimator = fg.ActivityPerturbation(seed=0, modules=["2", model[4]])
    assert [layer.name for layer in estimator.layers(model)] == ["2", "4"]
    estimator.estimate(model, per_example(model, x, y))
    assert model[0].weight.grad is None and model[4].weight.grad is not None


def test_bad_arguments():
    with pytest.raises(fg.ConfigurationError, match="positive integer"):
        fg.ActivityPerturbation(tangents=0)
    with pytest.raises(fg.ConfigurationError, match="unknown tangent distribution"):
        fg.ActivityPerturbation(distribution="orthogonal")
