import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, jvp

from forwardgrad.experiments.problems import (
    MODELS,
    PROBLEMS,
    TEST_FUNCTIONS,
    TestFunctionModel,
    beale,
    cnn,
    logistic_regression,
    make_model,
    make_test_function,
    mlp,
    rosenbrock,
)


def beale_grad(x: torch.Tensor) -> torch.Tensor:
    """Hand-derived: with t_k = c_k - a + a b^k (c = 1.5, 2.25, 2.625),
    df/da = Σ 2 t_k (b^k - 1), df/db = Σ 2 t_k k a b^(k-1)."""
    a, b = x
    grad = torch.zeros(2, dtype=x.dtype)
    for k, c in ((1, 1.5), (2, 2.25), (3, 2.625)):
        t = c - a + a * b**k
        grad[0] += 2 * t * (b**k - 1)
        grad[1] += 2 * t * k * a * b ** (k - 1)
    return grad


def rosenbrock_grad(x: torch.Tensor) -> torch.Tensor:
    """Hand-derived: each term i adds -400 x_i (x_{i+1} - x_i²) - 2 (1 - x_i) to g_i and
    200 (x_{i+1} - x_i²) to g_{i+1}."""
    grad = torch.zeros_like(x)
    for i in range(len(x) - 1):
        r = x[i + 1] - x[i] ** 2
        grad[i] += -400 * x[i] * r - 2 * (1 - x[i])
        grad[i + 1] += 200 * r
    return grad


def autograd(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x), x)
    return grad


def test_problem_names():
    assert tuple(PROBLEMS) == ("beale", "rosenbrock", "logreg", "mlp", "cnn", "deep-mlp")
    assert set(TEST_FUNCTIONS) | set(MODELS) == set(PROBLEMS)


# --------------------------------------------------------------------------- test functions


@pytest.mark.parametrize(
    "point", [(1.0, 1.0), (3.0, 0.5), (-2.0, 0.3), (0.7, -1.9), (4.5, 4.5), (-4.5, -4.5)]
)
def test_beale_gradient_matches_analytic(point):
    x = torch.tensor(point, dtype=torch.float64)
    torch.testing.assert_close(autograd(beale().fn, x), beale_grad(x))


@pytest.mark.parametrize("n", [2, 3, 7])
def test_rosenbrock_gradient_matches_analytic(n):
    x = torch.linspace(-1.5, 2.0, n, dtype=torch.float64)
    torch.testing.assert_close(autograd(rosenbrock(n).fn, x), rosenbrock_grad(x))


@given(
    st.integers(2, 12).flatmap(
        lambda n: st.lists(
            st.floats(-5, 5, allow_nan=False, allow_infinity=False), min_size=n, max_size=n
        )
    )
)
@settings(max_examples=100, deadline=None)
def test_rosenbrock_analytic_gradient_equals_autograd_at_random_points(values):
    x = torch.tensor(values, dtype=torch.float64)
    expected = rosenbrock_grad(x)
    torch.testing.assert_close(
        autograd(rosenbrock(len(values)).fn, x), expected, rtol=1e-10, atol=1e-9
    )


@pytest.mark.parametrize("function", [beale(), rosenbrock(2), rosenbrock(5)], ids=str)
def test_minimum_is_stationary_with_known_value(function):
    x = function.minimizer.double()
    assert function.minimum == 0.0
    assert function.fn(x).item() == 0.0
    assert torch.count_nonzero(autograd(function.fn, x)) == 0
    # and it is a minimum: nearby points are higher
    for direction in torch.eye(function.dim, dtype=torch.float64):
        assert function.fn(x + 1e-3 * direction) > 0
        assert function.fn(x - 1e-3 * direction) > 0


def test_starts_and_known_values():
    # Beale at Moré-Garbow-Hillstrom's start (1, 1): 1.5² + 2.25² + 2.625².
    assert beale().start.tolist() == [1.0, 1.0]
    assert beale().fn(beale().start.double()).item() == pytest.approx(14.203125)
    # Rosenbrock at (-1.2, 1): the classic 24.2.
    assert rosenbrock().fn(rosenbrock().start.double()).item() == pytest.approx(24.2)
    assert rosenbrock(5).start.tolist() == pytest.approx([-1.2, 1.0, -1.2, 1.0, -1.2])
    assert rosenbrock(4).minimizer.tolist() == [1.0] * 4


def test_bounds_frame_start_and_minimizer_in_2d_only():
    for function in (beale(), rosenbrock(2)):
        for point in (function.start, function.minimizer):
            for value, (lo, hi) in zip(point.tolist(), function.bounds, strict=True):
                assert lo <= value <= hi
    assert rosenbrock(3).bounds is None


def test_fn_evaluates_a_grid_of_points():
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    for function in (beale(), rosenbrock()):
        values = function.fn(grid)
        assert values.shape == (3, 4)
        assert values[2, 1] == function.fn(torch.tensor([2.0, 1.0]))


def test_make_test_function():
    assert make_test_function("beale").name == "beale"
    assert make_test_function("rosenbrock", dim=6).dim == 6
    with pytest.raises(ValueError, match="2 dimensions only"):
        make_test_function("beale", dim=3)
    with pytest.raises(ValueError, match="n >= 2"):
        make_test_function("rosenbrock", dim=1)
    with pytest.raises(ValueError, match="unknown test function 'mlp'"):
        make_test_function("mlp")


def test_test_function_model_trains_through_the_module_path():
    function = rosenbrock(2)
    model = TestFunctionModel(function)
    params = list(model.parameters())
    assert len(params) == 1 and params[0] is model.x
    assert torch.equal(model.x.detach(), function.start)
    model.x.data.add_(1.0)  # the model owns a copy; the function's start is untouched
    assert function.start.tolist() == pytest.approx([-1.2, 1.0])

    model = TestFunctionModel(function, start=torch.tensor([0.5, 0.5], dtype=torch.float64))
    closure = lambda: model()  # noqa: E731  -- the closure the estimators take
    loss = closure()
    assert loss.dim() == 0
    loss.backward()
    torch.testing.assert_close(model.x.grad, rosenbrock_grad(model.x.detach()))

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = closure()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    "name, count",
    [("logreg", 7_850), ("mlp", 1_863_690), ("cnn", 3_333_962), ("deep-mlp", 3_962_890)],
)
def test_model_parameter_counts(name, count):
    assert sum(p.numel() for p in make_model(name).parameters()) == count


def test_model_shapes():
    assert [tuple(p.shape) for p in logistic_regression().parameters()] == [(10, 784), (10,)]
    assert [tuple(p.shape) for p in mlp().parameters()] == [
        (1024, 784), (1024,), (1024, 1024), (1024,), (10, 1024), (10,),
    ]  # fmt: skip
    assert [tuple(p.shape) for p in cnn().parameters()] == [
        (64, 1, 3, 3), (64,), (64, 64, 3, 3), (64,), (64, 64, 3, 3), (64,), (64, 64, 3, 3), (64,),
        (1024, 3136), (1024,), (10, 1024), (10,),
    ]  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("num_classes", [10, 3])
def test_forward_pass_on_a_random_batch(name, num_classes):
    torch.manual_seed(0)
    model = make_model(name, num_classes=num_classes)
    logits = model(torch.rand(5, 1, 28, 28))
    assert logits.shape == (5, num_classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_models_support_forward_mode_ad(name):
    torch.manual_seed(0)
    model = make_model(name).double()
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def loss(p):
        return functional_call(model, p, (images,)).logsumexp(-1).mean()

    value, directional = jvp(loss, (params,), (tangents,))
    grads = torch.autograd.grad(loss(dict(model.named_parameters())), list(model.parameters()))
    expected = sum((g * t).sum() for g, t in zip(grads, tangents.values(), strict=True))
    torch.testing.assert_close(directional, expected)
    torch.testing.assert_close(value, loss(params))


def test_make_model_rejects_unknown_names():
    choices = "logreg, mlp, cnn, deep-mlp"
    with pytest.raises(ValueError, match=f"unknown model 'beale'; choose one of {choices}"):
        make_model("beale")
