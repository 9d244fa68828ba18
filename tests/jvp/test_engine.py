"""The derivative engine: which path ran is public, the first-use check catches small errors in
each setting, and vector-valued closures give each component's derivatives in one pass."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardgrad as fg
from forwardgrad import tangents as tg
from forwardgrad.jvp.rules import RULES


def gelu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 3))


@pytest.fixture
def sloppy_gelu():
    """The GELU rule off by a relative 5e-4, as a subtly wrong rule would be."""
    rule = RULES[torch.nn.functional.gelu]
    original = rule.apply

    def sloppy(mode, func, x, *args, **kwargs):
        out = original(mode, func, x, *args, **kwargs)
        mode.track(out, mode.tangent(out) * (1 + 5e-4))
        return out

    rule.apply = sloppy
    yield
    rule.apply = original


def test_a_rule_off_by_5e_4_is_caught_on_first_use(sloppy_gelu):
    model = gelu_net()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    estimator = fg.ForwardGradient(seed=0)
    with pytest.warns(fg.FallbackWarning, match="the rule for gelu is off by"):
        estimator.estimate(model, lambda: F.cross_entropy(model(x), y))
    assert estimator.last_path == "general"
    assert "gelu" in estimator.last_fallback
    exact = fg.ForwardGradient(seed=0, fast=False)
    reference = gelu_net()
    exact.estimate(reference, lambda: F.cross_entropy(reference(x), y))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7)  # the general path's


def test_each_mode_is_checked_the_first_time_it_is_used(monkeypatch):
    # A rule wrong only with running statistics (eval mode) passes a model used in train mode,
    # and is caught the first time the model runs in eval mode.
    rule = RULES[F.batch_norm]
    original = rule.apply

    def wrong_in_eval(mode, func, x, *args, **kwargs):
        out = original(mode, func, x, *args, **kwargs)
        training = kwargs.get("training", args[4] if len(args) > 4 else False)
        if not training:
            mode.track(out, mode.tangent(out) * 1.01)
        return out

    monkeypatch.setattr(rule, "apply", wrong_in_eval)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    estimator = fg.ForwardGradient(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fg.FallbackWarning)
        estimator.estimate(model, lambda: model(x).pow(2).mean())
    assert estimator.last_path == "fast"
    model.eval()
    with pytest.warns(fg.FallbackWarning, match="batch_norm"):
        estimator.estimate(model, lambda: model(x).pow(2).mean())
    assert estimator.last_path == "general"


def test_a_first_layer_is_checked_on_a_slice_of_its_batch(monkeypatch):
    # The first layer's input carries no tangent; the check still takes two of its rows, not
    # the whole batch in float64 (which made a ForwardSGD run's first step its largest).
    from forwardgrad.jvp import rule_check

    seen = []
    original = rule_check._tangents_of

    def record(mode, rule, func, values, *args):
        if rule.name == "linear":
            seen.append(values[0].shape)
        return original(mode, rule, func, values, *args)

    monkeypatch.setattr(rule_check, "_tangents_of", record)
    model = gelu_net()
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    fg.ForwardGradient(seed=0, rank=1).estimate(model, lambda: F.cross_entropy(model(x), y))
    assert seen and all(shape[0] == rule_check.ROWS for shape in seen), seen


class Scripted(nn.Module):
    """A linear layer then a TorchScript activation, which the stacked evaluation cannot see."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.activation = torch.jit.script(torch.nn.Tanh())

    def forward(self, x):
        return self.activation(self.linear(x))


def test_the_fallback_is_reported_once_and_kept():
    torch.manual_seed(0)
    model = Scripted()
    x = torch.randn(4, 3)
    estimator = fg.ForwardGradient(seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            estimator.estimate(model, lambda: model(x).sum())
    fallbacks = [w for w in caught if issubclass(w.category, fg.FallbackWarning)]
    assert len(fallbacks) == 1
    assert estimator.last_path == "general" and estimator.last_fallback
    assert fg.ForwardGradient(seed=1).estimate(model, lambda: model(x).sum()) is not None


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("count", [1, 3])
def test_vector_closures_give_per_example_derivatives(fast, count):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = list(model.parameters())

    def per_example():
        return F.cross_entropy(model(x), y, reduction="none")

    source = tg.HeldTangents(params, count, "normal", seed=4)
    result = fg.directional_derivatives(model, per_example, source, vector=True, fast=fast)
    assert result.path == ("fast" if fast else "general")
    assert result.value.shape == (6,) and result.derivatives.shape == (count, 6)
    for n in range(6):  # each example's exact gradient, along each tangent
        grads = torch.autograd.grad(per_example()[n], params)
        for k in range(count):
            expected = sum((g * v[k]).sum() for g, v in zip(grads, source.dense()))
            assert torch.allclose(result.derivatives[k, n], expected, rtol=1e-9, atol=1e-12)


def test_a_vector_closure_must_return_a_vector():
    model = nn.Linear(3, 2)
    source = tg.HeldTangents(list(model.parameters()), 1, "normal", seed=0)
    with pytest.raises(ValueError, match="vector of losses"):
        fg.directional_derivatives(model, lambda: model(torch.ones(4, 3)), source, vector=True)
    with pytest.raises(ValueError, match="must be a scalar"):
        fg.directional_derivatives(model, lambda: model(torch.ones(4, 3)).sum(1), source)


def test_the_first_use_check_compares_two_tangents_and_falls_back_with_all_of_them():
    torch.manual_seed(0)
    model = Scripted()
    x = torch.randn(4, 3)
    source = tg.HeldTangents(list(model.parameters()), 5, "normal", seed=2)
    with pytest.warns(fg.FallbackWarning):
        result = fg.directional_derivatives(model, lambda: model(x).sum(), source)
    reference = fg.directional_derivatives(model, lambda: model(x).sum(), source, fast=False)
    assert result.path == "general" and result.derivatives.shape == (5,)
    assert torch.allclose(result.derivatives, reference.derivatives)


@pytest.mark.parametrize("training", [True, False])
def test_the_rule_check_never_cuts_running_statistics_as_rows_of_the_batch(monkeypatch, training):
    # As many channels as rows: a check that sliced the batch's rows would cut batch norm's
    # running statistics too, and the kernel would write past the cut copy's end.
    torch.manual_seed(0)
    channels = batch = 8
    model = nn.Sequential(
        nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)
    ).train(training)
    x, y = torch.randn(batch, 3, 4, 4), torch.randint(0, 3, (batch,))
    seen = []

    def spy(kernel):
        def call(x, weight, bias, running_mean, running_var, *rest):
            seen.append((x.shape[1], running_mean.numel(), running_var.numel()))
            return kernel(x, weight, bias, running_mean, running_var, *rest)

        return call

    for name in ("native_batch_norm", "batch_norm"):  # train-mode rule, F.batch_norm
        monkeypatch.setattr(torch, name, spy(getattr(torch, name)))
    estimator = fg.ForwardGradient(seed=0)
    estimator.estimate(model, lambda: F.cross_entropy(model(x), y))
    assert estimator.last_path == "fast"
    assert seen and all(c == m == v for c, m, v in seen), seen
