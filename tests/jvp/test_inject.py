"""The engine's hook for tangents at activations: add_tangent on the fast and general paths, and
per-example directional derivatives against exact per-example gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardgrad as fg
from forwardgrad import tangents as tg
from forwardgrad.jvp import add_tangent, tangent_count

PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))


def perturb(modules, tangents):
    """Forward hooks that add ``tangents[i]`` at ``modules[i]``'s output; returns the handles."""

    def hook_for(u):
        return lambda module, args, output: add_tangent(output, u)

    return [m.register_forward_hook(hook_for(u)) for m, u in zip(modules, tangents)]


def per_example_output_gradients(model, layers, x, y):
    """∂ℓ_n/∂z^l_n for every example n and perturbed layer l, by autograd (rows of a batch do
    not interact, so the gradient of ℓ_n at row n is example n's own)."""
    outputs = []
    handles = [
        m.register_forward_hook(lambda m, a, out: outputs.append(out) or out) for m in layers
    ]
    try:
        losses = F.cross_entropy(model(x), y, reduction="none")
    finally:
        for h in handles:
            h.remove()
    rows = []
    for n in range(len(y)):
        grads = torch.autograd.grad(losses[n], outputs, retain_graph=True)
        rows.append([g[n] for g in grads])
    return [torch.stack([row[i] for row in rows]) for i in range(len(layers))]


@PATHS
@pytest.mark.parametrize("count", [1, 3])
def test_per_example_derivatives_along_injected_tangents_are_exact(fast, count):
    model = mlp().double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    layers = [model[0], model[2], model[4]]
    generator = torch.Generator().manual_seed(1)
    shapes = [(7, 5), (7, 6), (7, 3)]
    us = [torch.randn(count, *s, generator=generator, dtype=torch.float64) for s in shapes]
    handles = perturb(layers, us)
    try:
        result = fg.directional_derivatives(
            model,
            lambda: F.cross_entropy(model(x), y, reduction="none"),
            tg.TangentSource([], count),
            vector=True,
            fast=fast,
        )
    finally:
        for h in handles:
            h.remove()
    assert result.path == ("fast" if fast else "general"), result.fallback
    exact = per_example_output_gradients(model, layers, x, y)
    expected = sum(torch.einsum("nd,knd->kn", g, u) for g, u in zip(exact, us))
    assert result.derivatives.shape == (count, 7)
    torch.testing.assert_close(result.derivatives, expected, rtol=1e-10, atol=1e-12)


@PATHS
def test_injected_and_parameter_tangents_add_up(fast):
    # d = ∇_θ L · v + ∇_z L · u: the hook adds to the tangent the activation already carries.
    model = mlp().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    params = list(model.parameters())
    source = tg.HeldTangents(params, 2, "normal", seed=3)
    u = torch.randn(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def closure():
        return F.cross_entropy(model(x), y)

    handles = perturb([model[2]], [u])
    try:
        both = fg.directional_derivatives(model, closure, source, fast=fast)
    finally:
        for h in handles:
            h.remove()
    weights_only = fg.directional_derivatives(model, closure, source, fast=fast)
    (g,) = per_example_output_gradients(model, [model[2]], x, y)
    along_u = torch.einsum("nd,knd->k", g / 5, u)  # the mean loss: 1/B per example
    torch.testing.assert_close(both.derivatives, weights_only.derivatives + along_u)


@PATHS
def test_vector_closures_of_a_table_on_both_paths(fast):
    # A (G, B) table, flattened: every entry's derivative in one pass, as autograd gives it.
    model = mlp().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    params = list(model.parameters())

    def table():
        h = torch.tanh(model[0](x))
        first = F.cross_entropy(h[:, :3], y, reduction="none")
        return torch.stack([first, F.cross_entropy(model[2:](h.detach()), y, reduction="none")])

    source = tg.HeldTangents(params, 2, "normal", seed=5)
    result = fg.directional_derivatives(
        model, lambda: table().reshape(-1), source, vector=True, fast=fast
    )
    assert result.path == ("fast" if fast else "general")
    values = table().reshape(-1)
    for j in range(values.numel()):
        grads = torch.autograd.grad(values[j], params, retain_graph=True, allow_unused=True)
        for k in range(2):
            expected = sum((g * v[k]).sum() for g, v in zip(grads, source.dense()) if g is not None)
            torch.testing.assert_close(result.derivatives[k, j], expected)


def test_outside_an_evaluation_there_is_nothing_to_add_to():
    assert tangent_count() is None
    with pytest.raises(fg.EstimatorError, match="outside an evaluation"):
        add_tangent(torch.ones(3), torch.ones(1, 3))


@PATHS
def test_a_tangent_of_the_wrong_shape_is_refused(fast):
    model = nn.Linear(3, 2)
    seen = []

    def hook(module, args, output):
        seen.append(tangent_count())
        return add_tangent(output, torch.ones(2, 5, 2))  # K is 1

    model.register_forward_hook(hook)
    with pytest.raises(fg.EstimatorError, match=r"must be \(K, \*value.shape\) = \(1, 4, 2\)"):
        fg.directional_derivatives(
            model, lambda: model(torch.ones(4, 3)).sum(), tg.TangentSource([], 1), fast=fast
        )
    assert seen and set(seen) == {1}
