"""Convex constraint sets for Frank-Wolfe training.

Frank-Wolfe never projects: each step asks the set for the vertex that minimises a linear function,

    lmo(d) = argmin_{s in C} <d, s>,

and moves the parameter towards it, x <- x + gamma (s - x), which stays inside C because C is
convex. Each set here is a small immutable object with that linear minimization oracle (`lmo`), a
feasibility check (`contains`) and `project_start`, the Euclidean projection used once to give
Frank-Wolfe a feasible starting point. A set acts on one parameter tensor at a time, seen as a
flat vector (the nuclear-norm ball sees it as a matrix).

Command-line form (`parse_constraint`), radius R > 0, integer K >= 1:

    l1:R          {x : ||x||_1 <= R}
    l2:R          {x : ||x||_2 <= R}
    linf:R        {x : ||x||_inf <= R}                      (a box)
    simplex:R     {x : x >= 0, sum(x) = R}                  (scaled probability simplex)
    nuclear:R     {X : ||X||_* <= R}                        (2-D parameters only)
    k-sparse:K:R  {x : ||x||_inf <= R, ||x||_1 <= K R}      (hull of K-sparse vectors, entries +-R)
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from forwardgrad.errors import ConfigurationError

__all__ = [
    "Constraint",
    "L1Ball",
    "L2Ball",
    "LinfBall",
    "Simplex",
    "NuclearBall",
    "KSparsePolytope",
    "parse_constraint",
    "top_singular_pair",
    "CONSTRAINT_SETS",
    "CONSTRAINT_SYNTAX",
]


def _check_radius(owner: str, radius: object) -> float:
    ok = isinstance(radius, (int, float)) and not isinstance(radius, bool)
    if not ok or not math.isfinite(radius) or radius <= 0:
        raise ConfigurationError(
            f"{owner} radius must be a positive finite number, got {radius!r}; "
            f"pass e.g. {owner}(5.0) or the string form {CONSTRAINT_SYNTAX}."
        )
    return float(radius)


def _format_number(value: float) -> str:
    # Exact round trip through parse_constraint: "5" rather than "5.0", repr for the rest.
    return str(int(value)) if value.is_integer() else repr(value)


class Constraint(abc.ABC):
    """A compact convex set C that one parameter tensor must stay in.

    Subclasses implement the linear minimization oracle, a feasibility check and a projection used
    only to make the starting point feasible.
    """

    name: ClassVar[str]
    radius: float

    @abc.abstractmethod
    def lmo(self, grad: Tensor) -> Tensor:
        """Linear minimization oracle: s = argmin_{s in C} <grad, s>.

        Args:
            grad: the direction (a gradient or an average of gradient estimates), any shape.

        Returns:
            A vertex s of C with the shape, dtype and device of `grad`.
        """

    @abc.abstractmethod
    def contains(self, x: Tensor, rtol: float = 1e-4) -> bool:
        """Whether x lies in C, up to a slack of `rtol` times the radius (float rounding).

        Args:
            x: a parameter tensor.
            rtol: allowed violation relative to the radius.

        Returns:
            True if x is feasible to that tolerance.
        """

    @abc.abstractmethod
    def project_start(self, x: Tensor) -> Tensor:
        """Euclidean projection argmin_{y in C} ||y - x||_2, used once for a feasible start.

        Args:
            x: a parameter tensor.

        Returns:
            The nearest point of C, with the shape, dtype and device of `x` (x itself if feasible).
        """

    def check_param(self, param: Tensor) -> None:
        """Raise if this set cannot hold `param` (wrong shape, too few entries); default: any."""
        return None

    def __str__(self) -> str:
        return f"{self.name}:{_format_number(self.radius)}"


@dataclass(frozen=True)
class L1Ball(Constraint):
    """L1 ball {x : ||x||_1 <= radius}; its vertices are +-radius e_i, so FW iterates are sparse.

    LMO: s = -radius sign(d_i) e_i with i = argmax_i |d_i|.
    """

    radius: float
    name: ClassVar[str] = "l1"

    def __post_init__(self):
        object.__setattr__(self, "radius", _check_radius("L1Ball", self.radius))

    def lmo(self, grad: Tensor) -> Tensor:
        flat = grad.reshape(-1)
        i = torch.argmax(flat.abs())
        vertex = torch.zeros_like(flat)
        vertex[i] = -self.radius * torch.sign(flat[i])
        return vertex.view_as(grad)

    def contains(self, x: Tensor, rtol: float = 1e-4) -> bool:
        return bool(x.abs().sum() <= self.radius * (1 + rtol))

    def project_start(self, x: Tensor) -> Tensor:
        if x.abs().sum() <= self.radius:
            return x.clone()
        return torch.sign(x) * _project_simplex(x.abs(), self.radius)


@dataclass(frozen=True)
class L2Ball(Constraint):
    """Euclidean ball {x : ||x||_2 <= radius}.

    LMO: s = -radius d / ||d||_2 (s = 0 when d = 0).
    """

    radius: float
    name: ClassVar[str] = "l2"

    def __post_init__(self):
        object.__setattr__(self, "radius", _check_radius("L2Ball", self.radius))

    def lmo(self, grad: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(grad)
        return torch.where(norm > 0, -self.radius * grad / norm, torch.zeros_like(grad))

    def contains(self, x: Tensor, rtol: float = 1e-4) -> bool:
        return bool(torch.linalg.vector_norm(x) <= self.radius * (1 + rtol))

    def project_start(self, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x)
        return x * torch.clamp(self.radius / norm, max=1.0) if norm > 0 else x.clone()


@dataclass(frozen=True)
class LinfBall(Constraint):
    """Box {x : ||x||_inf <= radius}; every corner is a vertex.

    LMO: s = -radius sign(d) (entries with d_i = 0 get 0, also a minimiser).
    """

    radius: float
    name: ClassVar[str] = "linf"

    def __post_init__(self):
        object.__setattr__(self, "radius", _check_radius("LinfBall", self.radius))

    def lmo(self, grad: Tensor) -> Tensor:
        return -self.radius * torch.sign(grad)

    def contains(self, x: Tensor, rtol: float = 1e-4) -> bool:
        return bool(x.abs().max() <= self.radius * (1 + rtol))

    def project_start(self, x: Tensor) -> Tensor:
        return x.clamp(-self.radius, self.radius)


@dataclass(frozen=True)
class Simplex(Constraint):
    """Scaled probability simplex {x : x >= 0, sum(x) = radius}.

    LMO: s = radius e_i with i = argmin_i d_i.
    """

    radius: float = 1.0
    name: ClassVar[str] = "simplex"

    def __post_init__(self):
        object.__setattr__(self, "radius", _check_radius("Simplex", self.radius))

    def lmo(self, grad: Tensor) -> Tensor:
        flat = grad.reshape(-1)
        vertex = torch.zeros_like(flat)
        vertex[torch.argmin(flat)] = self.radius
        return vertex.view_as(grad)

    def contains(self, x: Tensor, rtol: float = 1e-4) -> bool:
        slack = self.radius * rtol
        return bool(x.min() >= -slack) and bool((x.sum() - self.radius).abs() <= slack)

    def project_start(self, x: Tensor) -> Tensor:
        return _project_simplex(x, self.radius)


@dataclass(frozen=True)
class NuclearBall(Constraint):
    """Nuclear-norm ball {X : ||X||_* = sum_i sigma_i(X) <= radius} for a matrix parameter.

    LMO: s = -radius u v^T with (u, v) the top singular pair of d, found by power iteration (not a
    full SVD): at most `power_iterations` rounds, stopping once sigma_1 changes by less than
    `tol` relative. An inexact pair still gives <d, s> >= -radius sigma_1 (1 - error), the
    approximate oracle that Frank-Wolfe theory allows. `contains` and `project_start` do use a
    full SVD, but only for checks and once at the start.
    """

    radius: float
    power_iterations: int = 100
    tol: float = 1e-6
    name: ClassVar[str] = "nuclear"

    def __post_init__(self):
        object.__setattr__(self, "radius", _check_radius("NuclearBall", self.radius))
        if not isinstance(self.power_iterations, int) or self.power_iterations < 1:
            raise ConfigurationError(
                f"NuclearBall power_iterations must be a positive integer, "
                f"got {self.power_iterations!r}."
            )

    def check_param(self, param: Tensor) -> None:
        if param.dim() != 2:
            raise ConfigurationError(
                f"a nuclear-norm constraint needs a matrix (2-D) parameter, got shape "
                f"{tuple(param.shape)}; put matrices in their own parameter group and give "
                f"biases and conv kernels another constraint."
            )

    def lmo(self, grad: Tensor) -> Tensor:
        self.check_param(grad)
        u, _, v = top_singular_pair(grad, self.power_iterations, self.tol)
        return (-self.radius * torch.outer(u, v)).to(grad.dtype)

    def contains(self, x: Tensor, rtol: float = 1e-4) -> bool:
        self.check_param(x)
        return bool(
            torch.linalg.matrix_norm(_at_least_float32(x), ord="nuc") <= self.radius * (1 + rtol)
        )

    def project_start(self, x: Tensor) -> Tensor:
        # Projecting onto the nuclear ball = projecting the singular values onto the L1 ball.
        self.check_param(x)
        u, sigma, vh = torch.linalg.svd(_at_least_float32(x), full_matrices=False)
        if sigma.sum() <= self.radius:
            return x.clone()
        sigma = _project_simplex(sigma, self.radius)
        return ((u * sigma) @ vh).to(x.dtype)


@dataclass(frozen=True)
class KSparsePolytope(Constraint):
    """K-sparse polytope {x : ||x||_inf <= radius, ||x||_1 <= k radius}.

    It is the convex hull of the vectors with k nonzero entries, each +-radius.
    LMO: s_i = -radius sign(d_i) on the k largest |d_i|, 0 elsewhere.
    """

    k: int
    radius: float
    name: ClassVar[str] = "k-sparse"

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ConfigurationError(
                f"KSparsePolytope k must be a positive integer, got {self.k!r}; "
                f"e.g. KSparsePolytope(k=10, radius=1.0) or 'k-sparse:10:1'."
            )
        object.__setattr__(self, "radius", _check_radius("KSparsePolytope", self.radius))

    def __str__(self) -> str:
        return f"{self.name}:{self.k}:{_format_number(self.radius)}"

    def check_param(self, param: Tensor) -> None:
        if self.k > param.numel():
            raise ConfigurationError(
                f"k-sparse constraint has k={self.k} but the parameter of shape "
                f"{tuple(param.shape)} has only {param.numel()} entries; choose k <= "
                f"{param.numel()}."
            )

    def lmo(self, grad: Tensor) -> Tensor:
        self.check_param(grad)
        flat = grad.reshape(-1)
        top = torch.topk(flat.abs(), self.k).indices
        vertex = torch.zeros_like(flat)
        vertex[top] = -self.radius * torch.sign(flat[top])
        return vertex.view_as(grad)

    def contains(self, x: Tensor, rtol: float = 1e-4) -> bool:
        magnitude = x.abs()
        in_box = magnitude.max() <= self.radius * (1 + rtol)
        return bool(in_box) and bool(magnitude.sum() <= self.k * self.radius * (1 + rtol))

    def project_start(self, x: Tensor) -> Tensor:
        # KKT: y_i = sign(x_i) min(radius, max(|x_i| - tau, 0)) with the smallest tau >= 0 that
        # meets the L1 budget; sum_i is monotone in tau, so bisection finds it.
        magnitude = x.abs().double()
        budget = self.k * self.radius
        low, high = 0.0, float(magnitude.max())
        if magnitude.clamp(max=self.radius).sum() <= budget:
            high = 0.0
        for _ in range(100):
            if high - low <= 1e-12 * max(1.0, high):
                break
            mid = 0.5 * (low + high)
            if (magnitude - mid).clamp(0, self.radius).sum() > budget:
                low = mid
            else:
                high = mid
        shrunk = (magnitude - high).clamp(0, self.radius)  # high: always inside the budget
        return (torch.sign(x) * shrunk.to(x.dtype)).to(x.dtype)


def _at_least_float32(x: Tensor) -> Tensor:
    # Half-precision SVDs and power iterations lose the digits the checks need.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _project_simplex(x: Tensor, radius: float) -> Tensor:
    """Euclidean projection of x (any shape) onto {y >= 0, sum(y) = radius}.

    Sort-based algorithm (Held et al. 1974; Duchi et al. 2008): y = max(x - tau, 0) with tau chosen
    so the entries sum to radius.
    """
    flat = x.reshape(-1)
    ordered = torch.sort(flat, descending=True).values
    excess = torch.cumsum(ordered, 0) - radius
    counts = torch.arange(1, flat.numel() + 1, device=x.device, dtype=ordered.dtype)
    support = ordered - excess / counts > 0  # true on a prefix; its length is the support size
    last = int(support.sum()) - 1
    tau = excess[last] / counts[last]
    return torch.clamp(flat - tau, min=0).view_as(x)


def top_singular_pair(
    matrix: Tensor, iterations: int = 100, tol: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triple (u, sigma_1, v) of a matrix by power iteration on M^T M.

    v <- M^T M v / ||M^T M v||, from a fixed-seed random start (deterministic, and almost surely
    not orthogonal to the top singular vector, unlike a start taken from M's rows).

    Args:
        matrix: a 2-D tensor M.
        iterations: the most rounds of power iteration.
        tol: stop once sigma_1 changes by less than this, relative.

    Returns:
        u (left, unit norm), sigma_1 (0-dim) and v (right, unit norm), computed in at least float32;
        u and v are zero when M is zero.
    """
    work = _at_least_float32(matrix)
    generator = torch.Generator(device=work.device).manual_seed(0)
    v = torch.randn(work.shape[1], generator=generator, device=work.device, dtype=work.dtype)
    v = v / torch.linalg.vector_norm(v)
    sigma = torch.zeros((), dtype=work.dtype, device=work.device)
    for _ in range(iterations):
        u = work @ v
        previous, sigma = sigma, torch.linalg.vector_norm(u)
        if sigma == 0:
            return torch.zeros_like(u), sigma, torch.zeros_like(v)
        v = work.T @ (u / sigma)
        v = v / torch.linalg.vector_norm(v)
        if (sigma - previous).abs() <= tol * sigma:
            break
    u = work @ v
    sigma = torch.linalg.vector_norm(u)
    return u / sigma, sigma, v


# The registry of constraint sets, by the name of their command-line form; the command line, the
# training loop read it. Every set is NAME:RADIUS, except the k-sparse polytope (K:RADIUS).
CONSTRAINT_SETS: dict[str, type[Constraint]] = {
    cls.name: cls for cls in (L1Ball, L2Ball, LinfBall, Simplex, NuclearBall, KSparsePolytope)
}
_FORMS = [
    f"{name}:{'K:' if cls is KSparsePolytope else ''}R" for name, cls in CONSTRAINT_SETS.items()
]
CONSTRAINT_SYNTAX = f"{', '.join(_FORMS[:-1])} or {_FORMS[-1]} (e.g. 'l1:5')"


def parse_constraint(spec: str | Constraint) -> Constraint:
    """Build a constraint from its command-line form (see the module docstring).

    Args:
        spec: 'NAME:RADIUS' with NAME in l1, l2, linf, simplex, nuclear, or 'k-sparse:K:RADIUS';
            a Constraint is returned unchanged.

    Returns:
        The Constraint; str() of it gives the spec back.
    """
    if isinstance(spec, Constraint):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"a constraint must be a Constraint or a string like 'l1:5', got "
            f"{type(spec).__name__}; write one of {CONSTRAINT_SYNTAX}."
        )
    name, *fields = [field.strip() for field in spec.strip().lower().split(":")]
    if name not in CONSTRAINT_SETS:
        raise ConfigurationError(f"unknown constraint {spec!r}; write one of {CONSTRAINT_SYNTAX}.")
    expected = 2 if name == "k-sparse" else 1
    if len(fields) != expected:
        form, example = (
            ("k-sparse:K:RADIUS", "k-sparse:10:1")
            if expected == 2
            else (f"{name}:RADIUS", f"{name}:5")
        )
        raise ConfigurationError(f"constraint {spec!r} should be written {form}, e.g. '{example}'.")
    try:
        radius = float(fields[-1])
    except ValueError:
        raise ConfigurationError(
            f"constraint {spec!r} has radius {fields[-1]!r}, which is not a number; "
            f"write e.g. '{name}:5'."
        ) from None
    if not math.isfinite(radius) or radius <= 0:
        raise ConfigurationError(
            f"constraint {spec!r} needs a positive finite radius, got {fields[-1]}."
        )
    if name != "k-sparse":
        return CONSTRAINT_SETS[name](radius)
    if not fields[0].isdigit() or int(fields[0]) < 1:
        raise ConfigurationError(
            f"constraint {spec!r} needs a positive integer K in k-sparse:K:RADIUS, got "
            f"{fields[0]!r}; write e.g. 'k-sparse:10:1'."
        )
    return KSparsePolytope(int(fields[0]), radius)
