"""ForwardSGD: the same step as ForwardGradient + torch.optim.SGD, in place, with no .grad."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardgrad as fg
from forwardgrad import tangents as tg
from forwardgrad.estimators import EstimatorError
from forwardgrad.optim.forward_sgd import ForwardSGD
from forwardgrad.tangents import streams


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def data(seed=1, batch=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)


@pytest.mark.parametrize("tangents", [1, 3])
@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
@pytest.mark.parametrize("fast", [True, False])
def test_same_step_as_forward_gradient_and_sgd(tangents, distribution, fast):
    x, y = data()
    a, b = net(), net()
    optimizer = ForwardSGD(a, 0.1, tangents=tangents, distribution=distribution, seed=5, fast=fast)
    estimator = fg.ForwardGradient(tangents, distribution, seed=5)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(3):
        loss_a = optimizer.step(lambda: F.cross_entropy(a(x), y))
        loss_b = estimator.estimate(b, lambda: F.cross_entropy(b(x), y))
        sgd.step()
        assert torch.allclose(loss_a, loss_b, rtol=1e-6)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in a.parameters())
    assert optimizer.last_path == ("fast" if fast else "general")


class Large(nn.Module):
    """A token table and a linear weight above tangents.CHUNK values: their tangents are drawn
    a block of rows at a time, in the evaluation and in the update."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(2100, 130)  # 273,000 values, rows straddle streams
        self.fc = nn.Linear(130, 2030)  # 263,900 values
        self.head = nn.Linear(2030, 3)

    def forward(self, tokens):
        return self.head(torch.relu(self.fc(self.embed(tokens).mean(1))))


@pytest.mark.parametrize("tangents", [1, 2])
def test_large_parameters_are_drawn_a_block_of_rows_at_a_time(tangents, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 2100, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(0)
    a = Large()
    b = Large()
    b.load_state_dict(a.state_dict())
    estimator = fg.ForwardGradient(tangents, "rademacher", seed=5)
    sgd = torch.optim.SGD(b.parameters(), lr=0.01)
    optimizer = ForwardSGD(a, lr=0.01, tangents=tangents, distribution="rademacher", seed=5)
    whole = streams.parameter_tangents

    def small_only(like, *args, **kwargs):
        assert like.numel() <= tg.CHUNK, "a large parameter's tangent was drawn whole"
        return whole(like, *args, **kwargs)

    for step in range(3):
        loss_b = estimator.estimate(b, lambda: F.cross_entropy(b(tokens), y))
        sgd.step()
        with monkeypatch.context() as patch:
            if step > 0:  # the first step checks the fast path against whole tangents, once
                patch.setattr(streams, "parameter_tangents", small_only)
            loss_a = optimizer.step(lambda: F.cross_entropy(a(tokens), y))
        assert torch.allclose(loss_a, loss_b, rtol=1e-6)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-6)
    assert optimizer.last_path == "fast"


def test_it_trains():
    x, y = data(batch=64)
    model = net()
    optimizer = ForwardSGD(model, lr=0.05, tangents=2, seed=0)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(300):
        optimizer.step(lambda: F.cross_entropy(model(x), y))
    assert F.cross_entropy(model(x), y).item() < 0.8 * first


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_learning_rate_schedulers_apply():
    x, y = data()
    start, c, d = net(), net(), net()
    fixed = ForwardSGD(c, lr=0.1, seed=2)
    halved = ForwardSGD(d, lr=0.1, seed=2)
    torch.optim.lr_scheduler.ExponentialLR(halved, gamma=0.5).step()
    assert halved.param_groups[0]["lr"] == pytest.approx(0.05)
    fixed.step(lambda: F.cross_entropy(c(x), y))
    halved.step(lambda: F.cross_entropy(d(x), y))
    for p, q, s in zip(c.parameters(), d.parameters(), start.parameters()):
        assert torch.allclose(q - s, (p - s) / 2, atol=1e-7)
    assert not torch.equal(c[0].weight, start[0].weight)


def test_state_dict_resumes_the_tangent_stream():
    x, y = data()
    model = net()
    optimizer = ForwardSGD(model, lr=0.1, seed=3)
    optimizer.step(lambda: F.cross_entropy(model(x), y))
    state = optimizer.state_dict()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer.step(lambda: F.cross_entropy(model(x), y))
    expected = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(snapshot)
    resumed = ForwardSGD(model, lr=0.1, seed=99)
    resumed.load_state_dict(state)
    resumed.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected))


def test_batch_norm_statistics_are_updated_once_per_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    x, y = data()
    with torch.no_grad():
        probe = nn.BatchNorm1d(4)
        probe(model[0](x))
        expected = probe.running_mean
    ForwardSGD(model, lr=0.1, tangents=3, seed=0).step(lambda: F.cross_entropy(model(x), y))
    assert torch.allclose(model[1].running_mean, expected, atol=1e-6)
    assert model[1].num_batches_tracked.item() == 1


def test_non_finite_loss_leaves_the_model_unchanged():
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = ForwardSGD(model, lr=0.1, seed=0)
    with pytest.raises(EstimatorError, match="nan"):
        optimizer.step(lambda: model(torch.ones(2, 6)).sum() * math.nan)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda m: ForwardSGD(list(m.parameters()), lr=0.1), TypeError, "takes the model"),
        (lambda m: ForwardSGD(m, lr=0), ValueError, "lr must be a positive"),
        (lambda m: ForwardSGD(m, lr=math.nan), ValueError, "lr must be a positive"),
        (lambda m: ForwardSGD(m, lr=0.1, tangents=0), ValueError, "positive integer"),
        (lambda m: ForwardSGD(m, lr=0.1, distribution="orthogonal"), ValueError, "rademacher"),
        (lambda m: ForwardSGD(m, lr=0.1).step(), ValueError, "needs the closure"),
    ],
)
def test_bad_arguments(make, error, words):
    with pytest.raises(error, match=words):
        make(net())


def test_closure_errors_surface_and_leave_the_model_unchanged():
    model = net()
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        model(torch.ones(2, 6))
        raise KeyError("boom")

    with pytest.raises(KeyError):
        ForwardSGD(model, lr=0.1, seed=0).step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_a_closure_the_rules_cannot_see_is_caught_on_the_first_step():
    # TorchScript runs below the stacked-tangent mode: its fast derivatives would be wrong, so
    # the first step's check against forward-mode AD sends the model to the general path.
    @torch.jit.script
    def activation(h):
        return torch.tanh(h) * 2.0

    x, y = data()
    a, b = net(), net()
    optimizer = ForwardSGD(a, lr=0.1, seed=5)
    estimator = fg.ForwardGradient(1, seed=5)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.step(lambda: F.cross_entropy(activation(a(x)), y))
        estimator.estimate(b, lambda: F.cross_entropy(activation(b(x)), y))
        sgd.step()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-6)
    assert optimizer.last_path == "general" and "TorchScript" in optimizer.last_fallback
