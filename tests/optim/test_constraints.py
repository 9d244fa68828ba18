"""Constraint sets: LMOs against brute force, feasibility checks, projections, parsing, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from forwardgrad.optim.constraints import (
    Constraint,
    KSparsePolytope,
    L1Ball,
    L2Ball,
    LinfBall,
    NuclearBall,
    Simplex,
    parse_constraint,
    top_singular_pair,
)

DIM = 5


def vertices(constraint: Constraint, n: int) -> torch.Tensor:
    """Every vertex of a polytope in R^n, enumerated from its definition, one per row."""
    r = constraint.radius
    if isinstance(constraint, Simplex):
        return r * torch.eye(n, dtype=torch.float64)
    if isinstance(constraint, L1Ball):
        return r * torch.cat([torch.eye(n), -torch.eye(n)]).double()
    if isinstance(constraint, LinfBall):
        return r * torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=torch.float64)
    if isinstance(constraint, KSparsePolytope):
        rows = []
        for support in itertools.combinations(range(n), constraint.k):
            for signs in itertools.product([-1.0, 1.0], repeat=constraint.k):
                row = torch.zeros(n, dtype=torch.float64)
                row[list(support)] = r * torch.tensor(signs, dtype=torch.float64)
                rows.append(row)
        return torch.stack(rows)
    raise AssertionError(f"no vertex list for {constraint}")


POLYTOPES = [L1Ball(2.0), LinfBall(0.5), Simplex(3.0), KSparsePolytope(2, 1.5)]
ALL_VECTOR_SETS = [*POLYTOPES, L2Ball(2.0)]


@pytest.mark.parametrize("constraint", POLYTOPES, ids=str)
def test_lmo_matches_brute_force_over_vertices(constraint):
    generator = torch.Generator().manual_seed(0)
    corners = vertices(constraint, DIM)
    for _ in range(20):
        grad = torch.randn(DIM, generator=generator, dtype=torch.float64)
        vertex = constraint.lmo(grad)
        assert torch.isclose(grad @ vertex, (corners @ grad).min(), rtol=1e-12, atol=1e-12)
        assert any(torch.allclose(vertex, corner) for corner in corners), "lmo must give a vertex"


def test_l2_lmo_is_minus_radius_times_unit_gradient_and_beats_random_points():
    generator = torch.Generator().manual_seed(1)
    ball = L2Ball(2.0)
    grad = torch.randn(DIM, generator=generator, dtype=torch.float64)
    vertex = ball.lmo(grad)
    assert torch.isclose(grad @ vertex, -2.0 * grad.norm())
    directions = torch.randn(1000, DIM, generator=generator, dtype=torch.float64)
    points = 2.0 * directions / directions.norm(dim=1, keepdim=True)
    assert (points @ grad).min() >= grad @ vertex - 1e-12


def test_lmo_of_zero_gradient_is_feasible():
    for constraint in ALL_VECTOR_SETS:
        vertex = constraint.lmo(torch.zeros(DIM))
        assert constraint.contains(vertex), str(constraint)
    assert NuclearBall(1.0).lmo(torch.zeros(3, 4)).abs().sum() == 0


def test_lmo_keeps_shape_dtype_and_treats_tensors_as_flat_vectors():
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    for constraint in ALL_VECTOR_SETS:
        vertex = constraint.lmo(grad)
        assert vertex.shape == grad.shape and vertex.dtype == grad.dtype
        assert torch.equal(vertex.reshape(-1), constraint.lmo(grad.reshape(-1)))


def test_nuclear_lmo_matches_full_svd():
    generator = torch.Generator().manual_seed(3)
    ball = NuclearBall(2.0)
    for shape in [(6, 4), (4, 6), (1, 5), (8, 8)]:
        grad = torch.randn(*shape, generator=generator, dtype=torch.float64)
        u, sigma, vh = torch.linalg.svd(grad)
        vertex = ball.lmo(grad)
        # <G, s> = -r sigma_1 is the exact minimum over the nuclear ball (its vertices are
        # -r u v^T for unit u, v); the power iteration stops at relative tol 1e-6.
        assert torch.isclose((grad * vertex).sum(), -2.0 * sigma[0], rtol=1e-5)
        expected = -2.0 * torch.outer(u[:, 0], vh[0])  # sign of (u, v) cancels in u v^T
        gap_ratio = float(sigma[1] / sigma[0]) if len(sigma) > 1 else 0.0
        if gap_ratio < 0.9:  # a clear spectral gap pins the singular vectors down too, to about
            # sqrt(tol): sigma_1 converges twice as fast as the vectors
            assert torch.allclose(vertex, expected, atol=1e-2)


def test_power_iteration_does_not_need_the_top_vector_in_a_row_of_the_matrix():
    # The row of largest norm, (2, 0), is orthogonal to the top right singular vector (0, 1):
    # a power iteration started from the rows would report sigma = 2 instead of sqrt(7.22).
    matrix = torch.tensor([[2.0, 0.0], [0.0, 1.9], [0.0, 1.9]])
    u, sigma, v = top_singular_pair(matrix)
    assert math.isclose(float(sigma), math.sqrt(2 * 1.9**2), rel_tol=1e-5)
    assert math.isclose(abs(float(v[1])), 1.0, rel_tol=1e-5)
    assert math.isclose(float(u.norm()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize(
    "constraint, inside, outside",
    [
        (L1Ball(1.0), [0.5, -0.5, 0.0], [0.5, -0.6, 0.0]),
        (L2Ball(1.0), [0.6, 0.8, 0.0], [0.6, 0.81, 0.0]),
        (LinfBall(1.0), [1.0, -1.0, 0.3], [1.01, 0.0, 0.0]),
        (Simplex(1.0), [0.2, 0.3, 0.5], [0.2, 0.3, 0.6]),
        (Simplex(1.0), [0.0, 0.0, 1.0], [-0.1, 0.1, 1.0]),
        (KSparsePolytope(2, 1.0), [1.0, -1.0, 0.0], [1.0, 1.0, 0.2]),
        (KSparsePolytope(2, 1.0), [0.7, 0.7, 0.6], [1.1, 0.0, 0.0]),
    ],
    ids=str,
)
def test_contains_separates_inside_from_outside(constraint, inside, outside):
    assert constraint.contains(torch.tensor(inside))
    assert not constraint.contains(torch.tensor(outside))


def test_contains_allows_only_the_stated_rounding_slack():
    assert L1Ball(10.0).contains(torch.tensor([10.0005]))
    assert not L1Ball(10.0).contains(torch.tensor([10.002]))
    assert not L1Ball(10.0).contains(torch.tensor([10.0005]), rtol=0.0)


def test_nuclear_contains_uses_the_sum_of_singular_values():
    diagonal = torch.diag(torch.tensor([0.6, 0.3, 0.1]))
    assert NuclearBall(1.0).contains(diagonal)
    assert not NuclearBall(0.95).contains(diagonal)


def support_value(constraint: Constraint, direction: torch.Tensor) -> torch.Tensor:
    """sup_{z in C} <direction, z>, attained at lmo(-direction)."""
    return (direction * constraint.lmo(-direction)).sum()


@pytest.mark.parametrize("constraint", [*ALL_VECTOR_SETS, NuclearBall(2.0)], ids=str)
def test_project_start_is_the_euclidean_projection(constraint):
    # y is the projection of x iff y is in C and <x - y, z - y> <= 0 for all z in C, i.e.
    # sup_z <x - y, z> <= <x - y, y>; the sup is read off the LMO (tested above).
    generator = torch.Generator().manual_seed(4)
    for scale in [0.1, 1.0, 10.0]:
        x = scale * torch.randn(4, 3, generator=generator, dtype=torch.float64)
        y = constraint.project_start(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert constraint.contains(y, rtol=1e-9)
        residual = x - y
        inner = (residual * y).sum()  # equals the sup when x is outside C: allow LMO rounding
        assert support_value(constraint, residual) <= inner + 1e-6 * (1 + inner.abs())
        if constraint.contains(x, rtol=0.0):
            assert torch.allclose(y, x)


def test_project_start_checks_against_known_projections():
    assert torch.allclose(
        Simplex(1.0).project_start(torch.tensor([0.5, 0.0, 2.0])), torch.tensor([0.0, 0.0, 1.0])
    )
    assert torch.allclose(
        L1Ball(1.0).project_start(torch.tensor([2.0, -1.0])), torch.tensor([1.0, 0.0])
    )
    # |x| - tau with tau = 13/6 meets the L1 budget k r = 2 and stays under the box bound 1.
    assert torch.allclose(
        KSparsePolytope(2, 1.0).project_start(torch.tensor([3.0, -3.0, 2.5])),
        torch.tensor([5 / 6, -5 / 6, 1 / 3]),
        atol=1e-6,
    )
    projected = NuclearBall(1.0).project_start(torch.diag(torch.tensor([3.0, 1.0, 0.5])))
    assert torch.allclose(projected, torch.diag(torch.tensor([1.0, 0.0, 0.0])), atol=1e-6)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("l1:5", L1Ball(5.0)),
        ("l2:0.5", L2Ball(0.5)),
        ("linf:1e-2", LinfBall(0.01)),
        ("simplex:1", Simplex(1.0)),
        ("nuclear:3", NuclearBall(3.0)),
        ("k-sparse:10:2", KSparsePolytope(10, 2.0)),
        (" L1 : 5 ", L1Ball(5.0)),
    ],
)
def test_parse_constraint_reads_the_command_line_form(spec, expected):
    parsed = parse_constraint(spec)
    assert parsed == expected
    assert parse_constraint(str(parsed)) == parsed


def test_str_round_trips_exactly():
    for constraint in [L1Ball(0.1), Simplex(123456789.0), KSparsePolytope(3, 1 / 3)]:
        assert parse_constraint(str(constraint)) == constraint
    assert str(L1Ball(5)) == "l1:5"
    assert str(KSparsePolytope(4, 2.5)) == "k-sparse:4:2.5"
    constraint = L2Ball(1.0)
    assert parse_constraint(constraint) is constraint


@pytest.mark.parametrize(
    "spec, message",
    [
        ("l3:5", "unknown constraint"),
        ("ball", "unknown constraint"),
        ("l1", "should be written l1:RADIUS"),
        ("l1:5:2", "should be written l1:RADIUS"),
        ("k-sparse:5", "should be written k-sparse:K:RADIUS"),
        ("l1:0", "positive finite radius"),
        ("l2:-1", "positive finite radius"),
        ("simplex:inf", "positive finite radius"),
        ("linf:nan", "positive finite radius"),
        ("l1:five", "not a number"),
        ("k-sparse:0:1", "positive integer K"),
        ("k-sparse:2.5:1", "positive integer K"),
        ("k-sparse:3:-1", "positive finite radius"),
    ],
)
def test_parse_constraint_rejects_bad_specs_with_one_sentence(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_constraint(spec)
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


def test_parse_constraint_rejects_non_strings():
    with pytest.raises(TypeError, match="Constraint or a string"):
        parse_constraint(5)


@pytest.mark.parametrize("radius", [0, -1.0, float("nan"), float("inf"), True, "5"])
@pytest.mark.parametrize("cls", [L1Ball, L2Ball, LinfBall, Simplex, NuclearBall])
def test_constructors_reject_bad_radii(cls, radius):
    with pytest.raises(ValueError, match="radius must be a positive finite number"):
        cls(radius)


def test_k_sparse_rejects_bad_k_and_k_larger_than_the_parameter():
    for k in [0, -2, 1.5, True]:
        with pytest.raises(ValueError, match="k must be a positive integer"):
            KSparsePolytope(k, 1.0)
    with pytest.raises(ValueError, match="k=7 but the parameter of shape \\(2, 3\\)"):
        KSparsePolytope(7, 1.0).check_param(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="choose k <= 6"):
        KSparsePolytope(7, 1.0).lmo(torch.zeros(2, 3))
    KSparsePolytope(6, 1.0).check_param(torch.zeros(2, 3))


def test_nuclear_ball_rejects_parameters_that_are_not_matrices():
    ball = NuclearBall(1.0)
    for shape in [(5,), (2, 3, 4), ()]:
        with pytest.raises(ValueError, match="needs a matrix \\(2-D\\) parameter"):
            ball.check_param(torch.zeros(shape))
        with pytest.raises(ValueError, match="2-D"):
            ball.lmo(torch.zeros(shape))
    with pytest.raises(ValueError, match="power_iterations"):
        NuclearBall(1.0, power_iterations=0)
