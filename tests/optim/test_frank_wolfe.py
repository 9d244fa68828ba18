"""FrankWolfe: feasibility, the update and gap, averaging vs raw forward gradients, state, errors.

The convergence tests compare three runs of the same length on convex problems whose optimum f*
is computed independently (accelerated projected gradient in float64): Frank-Wolfe with the exact
gradient, with averaged forward gradients and with raw forward gradients (K = 1, normal tangents).
Tolerances come from the same runs with tangent seeds 0-7 (f(x0) - f* = 0.098 and 0.34): averaged
forward-gradient FW ended 1.6e-3..6.8e-3 above f* on least squares (mean 4.8e-3, sd 1.8e-3) and
6.2e-3..1.5e-2 on logistic regression (mean 9.1e-3, sd 3e-3); raw ended 3.4e-2..4.7e-2 (sd 4e-3)
and 0.21..0.23. Each threshold is at least 4 standard deviations from the runs it must pass;
the late gap of raw runs was 6.5x to 30x that of averaged runs (asserted: 4x).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad import Backprop, ForwardGradient, ZerothOrder
from forwardgrad.optim.constraints import (
    KSparsePolytope,
    L1Ball,
    L2Ball,
    LinfBall,
    NuclearBall,
    Simplex,
    _project_simplex,
)
from forwardgrad.optim.frank_wolfe import FrankWolfe, averaging_rate, open_loop_step_size

STEPS = 1000


class Vector(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.x = nn.Parameter(init.clone())


def least_squares(a, b, x):
    return 0.5 * ((a @ x - b) ** 2).mean()


def logistic(a, y, x):
    return F.softplus(-y * (a @ x)).mean()


def reference_optimum(loss, a, b, project, x0, iterations=3000):
    """f* by FISTA (accelerated projected gradient) in float64: independent of Frank-Wolfe."""
    a, b = a.double(), b.double()
    lipschitz = torch.linalg.matrix_norm(a, 2) ** 2 / a.shape[0]  # bound for both losses
    x = y = x0.double()
    momentum = 1.0
    for _ in range(iterations):
        point = y.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss(a, b, point), point)
        x_next = project(y - grad / lipschitz)
        momentum_next = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        y = x_next + (momentum - 1) / momentum_next * (x_next - x)
        x, momentum = x_next, momentum_next
    return float(loss(a, b, x))


def run_frank_wolfe(loss, a, b, x0, constraint, estimator, averaging, steps=STEPS):
    model = Vector(x0)
    optimizer = FrankWolfe(model.parameters(), constraint=constraint, averaging=averaging)
    gaps = []
    for _ in range(steps):
        estimator.estimate(model, lambda: loss(a, b, model.x))
        optimizer.step()
        gaps.append(optimizer.last_gap)
    final = float(loss(a, b, model.x.detach()))
    early, late = sum(gaps[:20]) / 20, sum(gaps[-100:]) / 100
    return final, early, late


@pytest.fixture(scope="module")
def simplex_least_squares():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 10, generator=generator), torch.randn(30, generator=generator)
    x0 = torch.full((10,), 0.1)
    best = reference_optimum(least_squares, a, b, lambda v: _project_simplex(v, 1.0), x0)
    return a, b, x0, best


@pytest.fixture(scope="module")
def l1_logistic_regression():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(30, 10, generator=generator)
    w = torch.zeros(10)
    w[:3] = torch.tensor([3.0, -2.0, 2.0])
    y = torch.where(torch.rand(30, generator=generator) < torch.sigmoid(a @ w), 1.0, -1.0)
    x0 = torch.zeros(10)
    best = reference_optimum(logistic, a, y, L1Ball(2.0).project_start, x0)
    return a, y, x0, best


@pytest.mark.parametrize(
    "problem, loss, constraint, averaged_tol, raw_floor",
    [
        ("simplex_least_squares", least_squares, "simplex:1", 0.012, 0.025),
        ("l1_logistic_regression", logistic, "l1:2", 0.025, 0.1),
    ],
)
def test_averaged_forward_gradient_reaches_the_optimum_and_raw_stalls(
    request, problem, loss, constraint, averaged_tol, raw_floor
):
    a, b, x0, best = request.getfixturevalue(problem)
    exact, _, exact_gap = run_frank_wolfe(loss, a, b, x0, constraint, Backprop(), False, 300)
    averaged, averaged_early, averaged_gap = run_frank_wolfe(
        loss, a, b, x0, constraint, ForwardGradient(seed=0), True
    )
    raw, _, raw_gap = run_frank_wolfe(loss, a, b, x0, constraint, ForwardGradient(seed=0), False)

    assert exact - best < 1e-4, "exact-gradient Frank-Wolfe must reach f*"
    assert averaged - best < averaged_tol, "averaged forward gradients reach f* to tolerance"
    assert averaged_gap < averaged_early / 4, "the averaged run's Frank-Wolfe gap falls"
    assert raw - best > raw_floor, "raw forward gradients stall away from f*"
    assert raw - best > 3 * (averaged - best)
    assert raw_gap > 4 * averaged_gap, "raw forward gradients stall at a larger gap"
    assert exact_gap < averaged_gap


SETS = [
    L1Ball(1.0),
    L2Ball(1.0),
    LinfBall(0.1),
    Simplex(2.0),
    NuclearBall(1.0),
    KSparsePolytope(3, 0.2),
]


@pytest.mark.parametrize("lr", ["2/(t+2)", 0.3])
@pytest.mark.parametrize("constraint", SETS, ids=str)
def test_iterates_stay_feasible_at_every_step(constraint, lr):
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    target = 3 * torch.randn(4, 5)  # far outside every set: the constraint is active
    optimizer = FrankWolfe(model.parameters(), constraint=constraint, lr=lr)
    estimator = ForwardGradient(seed=1)
    assert constraint.contains(model.weight.detach())
    for _ in range(60):
        estimator.estimate(model, lambda: ((model.weight - target) ** 2).sum())
        optimizer.step()
        assert constraint.contains(model.weight.detach(), rtol=1e-5)
        assert optimizer.last_gap >= -1e-5


def test_one_step_is_the_frank_wolfe_update_and_gap():
    model = Vector(torch.tensor([0.2, 0.3, 0.5]))
    optimizer = FrankWolfe(model.parameters(), constraint=Simplex(1.0), lr=0.25, averaging=False)
    model.x.grad = torch.tensor([1.0, -2.0, 0.5])
    optimizer.step()
    vertex = torch.tensor([0.0, 1.0, 0.0])  # argmin of the gradient's entries
    expected = torch.tensor([0.2, 0.3, 0.5]) + 0.25 * (vertex - torch.tensor([0.2, 0.3, 0.5]))
    assert torch.allclose(model.x.detach(), expected)
    gap = torch.tensor([1.0, -2.0, 0.5]) @ (torch.tensor([0.2, 0.3, 0.5]) - vertex)
    assert optimizer.last_gap == pytest.approx(float(gap))
    assert optimizer.last_group_gaps == [pytest.approx(float(gap))]
    assert optimizer.last_group_step_sizes == [0.25]


def test_a_step_size_overwritten_after_construction_is_checked_too():
    model = Vector(torch.zeros(3))
    optimizer = FrankWolfe(model.parameters(), constraint="l1:1")
    optimizer.param_groups[0]["lr"] = 2.0  # as a learning-rate scheduler would
    model.x.grad = torch.ones(3)
    with pytest.raises(ValueError, match="would leave the constraint set"):
        optimizer.step()


def test_sparse_gradients_are_refused():
    model = Vector(torch.zeros(3))
    optimizer = FrankWolfe(model.parameters(), constraint="l1:1")
    model.x.grad = torch.ones(3).to_sparse()
    with pytest.raises(ValueError, match="does not support sparse gradients"):
        optimizer.step()


def test_averaging_follows_the_stated_schedule():
    model = Vector(torch.zeros(3))
    optimizer = FrankWolfe(model.parameters(), constraint="l2:1")
    first, second = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    model.x.grad = first.clone()
    optimizer.step()
    assert torch.equal(optimizer.state[model.x]["average"], first)  # rho_0 = 1
    model.x.grad = second.clone()
    optimizer.step()
    rho = 4 / 9 ** (2 / 3)
    assert averaging_rate(1) == pytest.approx(rho)
    assert torch.allclose(optimizer.state[model.x]["average"], (1 - rho) * first + rho * second)
    assert optimizer.last_group_step_sizes == [pytest.approx(2 / 3)]  # gamma_1 = 2 / (1 + 2)
    assert optimizer.state[model.x]["step"] == 2
    assert [open_loop_step_size(t) for t in range(3)] == [1.0, 2 / 3, 0.5]
    assert averaging_rate(0) == 1.0 and averaging_rate(1000) < 0.04


def test_without_averaging_no_average_is_stored():
    model = Vector(torch.zeros(3))
    optimizer = FrankWolfe(model.parameters(), constraint="l2:1", averaging=False)
    model.x.grad = torch.ones(3)
    optimizer.step()
    assert "average" not in optimizer.state[model.x]


def test_parameter_groups_have_their_own_constraints_and_gaps():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    optimizer = FrankWolfe(
        [
            {"params": [model.weight], "constraint": NuclearBall(2.0)},
            {"params": [model.bias], "lr": 0.5, "averaging": False},
        ],
        constraint="linf:0.1",
    )
    assert isinstance(optimizer.param_groups[1]["constraint"], LinfBall)
    x = torch.randn(16, 6)
    estimator = ForwardGradient(seed=0)
    for _ in range(5):
        estimator.estimate(model, lambda: model(x).pow(2).mean())
        optimizer.step()
    assert NuclearBall(2.0).contains(model.weight.detach())
    assert LinfBall(0.1).contains(model.bias.detach())
    assert len(optimizer.last_group_gaps) == 2
    assert optimizer.last_gap == pytest.approx(sum(optimizer.last_group_gaps))


def test_parameters_without_grad_are_left_alone():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
    optimizer = FrankWolfe(model.parameters(), constraint="l1:100")
    bias_before = model.bias.detach().clone()
    model.weight.grad = torch.ones(2, 3)
    optimizer.step()
    assert torch.equal(model.bias.detach(), bias_before)
    assert model.weight.abs().sum() > 0


def test_infeasible_start_is_projected_by_default_and_raises_on_request():
    start = torch.tensor([3.0, -1.0, 0.5])
    model = Vector(start)
    FrankWolfe(model.parameters(), constraint="l1:1")
    assert torch.allclose(model.x.detach(), L1Ball(1.0).project_start(start))
    model = Vector(start)
    with pytest.raises(
        ValueError, match="lies outside the constraint set l1:1.*project_start=True"
    ):
        FrankWolfe(model.parameters(), constraint="l1:1", project_start=False)
    assert torch.equal(model.x.detach(), start)
    FrankWolfe(Vector(start).parameters(), constraint="l1:5", project_start=False)  # feasible


def test_state_dict_round_trip_resumes_exactly():
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=generator) for _ in range(10)]
    model = nn.Linear(3, 4, bias=False)
    optimizer = FrankWolfe(model.parameters(), constraint=NuclearBall(1.0, power_iterations=50))
    for grad in grads[:5]:
        model.weight.grad = grad.clone()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # constraints are saved as strings
    assert checkpoint["optimizer"]["param_groups"][0]["constraint"] == "nuclear:1"

    resumed_model = nn.Linear(3, 4, bias=False)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = FrankWolfe(resumed_model.parameters(), constraint=NuclearBall(1.0, 50))
    kept = resumed.param_groups[0]["constraint"]
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.param_groups[0]["constraint"] is kept  # same set: the object is kept
    for grad in grads[5:]:
        model.weight.grad = grad.clone()
        resumed_model.weight.grad = grad.clone()
        optimizer.step()
        resumed.step()
    assert torch.equal(model.weight, resumed_model.weight)
    assert resumed.state[resumed_model.weight]["step"] == 10

    other = FrankWolfe(nn.Linear(3, 4, bias=False).parameters(), constraint="l2:1")
    other.load_state_dict(checkpoint["optimizer"])
    assert other.param_groups[0]["constraint"] == NuclearBall(1.0)  # the saved set wins


def test_step_returns_the_closure_loss():
    model = Vector(torch.tensor([0.5, 0.5]))
    optimizer = FrankWolfe(model.parameters(), constraint="simplex:1")

    def closure():
        optimizer.zero_grad()
        loss = (model.x**2).sum()
        loss.backward()
        return loss

    assert float(optimizer.step(closure).detach()) == pytest.approx(0.5)


def test_works_with_the_zeroth_order_estimator():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 10, generator=generator), torch.randn(30, generator=generator)
    model = Vector(torch.full((10,), 0.1))
    optimizer = FrankWolfe(model.parameters(), constraint="simplex:1")
    estimator = ZerothOrder(seed=0)
    start = float(least_squares(a, b, model.x.detach()))
    for _ in range(200):
        estimator.estimate(model, lambda: least_squares(a, b, model.x))
        optimizer.step()
        assert Simplex(1.0).contains(model.x.detach())
    assert float(least_squares(a, b, model.x.detach())) < start


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({}, ValueError, "needs a constraint set"),
        ({"constraint": "l7:1"}, ValueError, "unknown constraint"),
        ({"constraint": "l1:-1"}, ValueError, "positive finite radius"),
        ({"constraint": 3.0}, TypeError, "Constraint or a string"),
        ({"constraint": "l1:1", "lr": "1/t"}, ValueError, "lr='1/t' is not a known schedule"),
        ({"constraint": "l1:1", "lr": 0.0}, ValueError, "lr must be"),
        ({"constraint": "l1:1", "lr": 1.5}, ValueError, "would leave the constraint set"),
        ({"constraint": "l1:1", "rho": -0.1}, ValueError, "rho must be"),
        ({"constraint": "nuclear:1"}, ValueError, "needs a matrix \\(2-D\\) parameter"),
        ({"constraint": "k-sparse:11:1"}, ValueError, "has only 10 entries"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        FrankWolfe(Vector(torch.zeros(10)).parameters(), **kwargs)
