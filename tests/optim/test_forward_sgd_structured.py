"""ForwardSGD with structured tangents: the step of ForwardGradient + SGD, the dense update with
the tangent formed, and no matrix's tangent formed at all once the fast path is checked."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardgrad as fg
from forwardgrad import tangents as tg
from forwardgrad.optim.forward_sgd import ForwardSGD
from forwardgrad.seeds import draw_seed, seeded_generator
from forwardgrad.tangents import streams, structured


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def data(seed=1, batch=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)


@pytest.mark.parametrize("tangents", [1, 3])
@pytest.mark.parametrize(("distribution", "rank"), [("normal", 1), ("rademacher", 2)])
@pytest.mark.parametrize("fast", [True, False])
def test_same_step_as_forward_gradient_and_sgd(tangents, distribution, rank, fast):
    x, y = data()
    a, b = net(), net()
    optimizer = ForwardSGD(a, 0.1, tangents, distribution, seed=5, fast=fast, rank=rank)
    estimator = fg.ForwardGradient(tangents, distribution, seed=5, rank=rank)
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


@pytest.mark.parametrize(("tangents", "rank"), [(1, 1), (2, 3)])
def test_in_place_update_equals_the_dense_update_with_the_formed_tangents(tangents, rank):
    # θ ← θ − (η/K) Σ_k d_k V_k, with V_k formed whole and d_k by the general path on them.
    x, y = data()
    model = net().double()
    x = x.double()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    step_seed = draw_seed(seeded_generator(11))  # the optimizer's first draw
    formed = [
        structured.structured_tangents(p, tangents, "normal", step_seed, i, rank)
        for i, p in enumerate(params)
    ]
    assert torch.linalg.matrix_rank(formed[0][0]) == rank

    def closure():
        return F.cross_entropy(model(x), y)

    given = tg.GivenTangents(params, formed)
    d = fg.directional_derivatives(model, closure, given, fast=False).derivatives
    ForwardSGD(model, lr=0.3, tangents=tangents, seed=11, rank=rank).step(closure)
    for p, start, v in zip(params, before, formed):
        expected = start - 0.3 / tangents * torch.tensordot(d, v, dims=1)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


class Large(nn.Module):
    """A token table and a linear weight above tangents.CHUNK values (as in test_forward_sgd)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(2100, 130)
        self.fc = nn.Linear(130, 2030)
        self.head = nn.Linear(2030, 3)

    def forward(self, tokens):
        return self.head(torch.relu(self.fc(self.embed(tokens).mean(1))))


@pytest.mark.parametrize("tangents", [1, 2])
def test_no_matrix_tangent_is_formed_after_the_first_step(tangents, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 2100, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(0)
    a = Large()
    b = Large()
    b.load_state_dict(a.state_dict())
    estimator = fg.ForwardGradient(tangents, "rademacher", seed=5, rank=1)
    sgd = torch.optim.SGD(b.parameters(), lr=0.01)
    optimizer = ForwardSGD(a, lr=0.01, tangents=tangents, distribution="rademacher", seed=5, rank=1)
    dense = streams.parameter_tangents

    def vectors_only(like, *args, **kwargs):
        assert like.dim() < 2, "a matrix's dense tangent was drawn"
        return dense(like, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a structured tangent was formed whole")

    for step in range(3):
        loss_b = estimator.estimate(b, lambda: F.cross_entropy(b(tokens), y))
        sgd.step()
        with monkeypatch.context() as patch:
            if step > 0:  # the first step checks the fast path against the general path, once
                patch.setattr(streams, "parameter_tangents", vectors_only)
                patch.setattr(structured, "materialise", refuse)
            loss_a = optimizer.step(lambda: F.cross_entropy(a(tokens), y))
        assert torch.allclose(loss_a, loss_b, rtol=1e-6)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-6)
    assert optimizer.last_path == "fast"


def test_state_dict_resumes_the_tangent_stream():
    x, y = data()
    model = net()
    optimizer = ForwardSGD(model, lr=0.1, seed=3, rank=1)
    optimizer.step(lambda: F.cross_entropy(model(x), y))
    state = optimizer.state_dict()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer.step(lambda: F.cross_entropy(model(x), y))
    expected = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(snapshot)
    resumed = ForwardSGD(model, lr=0.1, seed=99, rank=1)
    resumed.load_state_dict(state)
    resumed.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected))
