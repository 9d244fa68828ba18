"""The rules that take a structured tangent as its factors, V_k = A_k B_kᵀ, against
torch.func.jvp along the tangent the factors form, and on modules without ever forming it.

Table-driven like test_rules: every spelling of every rule that names ``structured`` positions,
on the rule's own samples, with the tensor at such a position given rank-1 and rank-2 factors.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

import forwardgrad as fg
from forwardgrad import tangents as tg
from forwardgrad.jvp import stacked
from forwardgrad.jvp.rules import RULES, factored
from forwardgrad.tangents import structured

CASES = [
    pytest.param(f, rule, id=f"{rule.name}:{getattr(f, '__qualname__', f)}")
    for f, rule in RULES.items()
    if rule.structured
]


def _accepts(func, args, kwargs) -> bool:
    flat, spec = tree_flatten((args, kwargs))
    args, kwargs = tree_unflatten([v.clone() if torch.is_tensor(v) else v for v in flat], spec)
    try:
        return func(*args, **kwargs) is not NotImplemented
    except (TypeError, RuntimeError, ValueError, IndexError):
        return False


def _factor_cases(rule, func):
    """(flat, spec, carrying positions, structured position, rank) for each sample the spelling
    takes and each structured position holding a matrix wider than the rank."""
    for args, kwargs in rule.samples(torch.float64):
        if not _accepts(func, args, kwargs):
            continue
        flat, spec = tree_flatten((args, kwargs))
        carrying = [
            i
            for i, v in enumerate(flat)
            if torch.is_tensor(v) and v.is_floating_point() and i not in rule.constant
        ]
        for position in rule.structured:
            for rank in (1, 2):
                if position < len(args) and tg.is_structured(args[position], rank):
                    assert flat[position] is args[position]
                    yield flat, spec, carrying, position, rank


def _factors(like, rank, generator):
    m, n = structured.matrix_shape(like)
    a = torch.randn(2, m, rank, dtype=like.dtype, generator=generator) / rank**0.5
    return a, torch.randn(2, n, rank, dtype=like.dtype, generator=generator)


def _check(func, flat, spec, carrying, position, rank):
    """Whether the rule took the factors; asserts its tangents against torch.func.jvp."""
    generator = torch.Generator().manual_seed(rank)
    factors = _factors(flat[position], rank, generator)
    tangents = {
        i: torch.randn((2, *flat[i].shape), dtype=flat[i].dtype, generator=generator)
        for i in carrying
    }
    tangents[position] = structured.materialise(factors, flat[position].shape)
    mode = stacked.StackedTangents(tg.GivenTangents([], [torch.zeros(2)]))
    inputs = [v.clone() if torch.is_tensor(v) else v for v in flat]
    for i, t in tangents.items():
        mode.track(inputs[i], t.clone(), fresh=True)
    mode.track_factors(inputs[position], factors)
    args, kwargs = tree_unflatten(inputs, spec)
    with torch.no_grad(), mode:
        out = func(*args, **kwargs)
    got = mode.tangent(out)
    for k in range(2):

        def f(*values):
            full = list(flat)
            for i, value in zip(carrying, values):
                full[i] = value
            a, kw = tree_unflatten(full, spec)
            return func(*a, **kw)

        primals = tuple(flat[i] for i in carrying)
        _, expected = torch.func.jvp(f, primals, tuple(tangents[i][k] for i in carrying))
        scale = max(1.0, float(expected.abs().max()))
        assert torch.allclose(got[k], expected, rtol=0, atol=1e-9 * scale), (
            f"{func} off by {float((got[k] - expected).abs().max()):.3g} with rank-{rank} "
            f"factors at position {position}"
        )
    return mode.factored > 0


@pytest.mark.parametrize(("func", "rule"), CASES)
def test_factored_rule_matches_torch_func_jvp(func, rule):
    used = [_check(func, *case) for case in _factor_cases(rule, func)]
    if func not in (torch.bmm, torch.Tensor.bmm):  # batched operands: no matrix to factor
        assert used and any(used), f"no sample of {rule.name} took the factors"


def test_the_factored_rules_are_those_of_the_products():
    names = {rule.name for _, rule in RULES.items() if rule.structured}
    assert names == {"linear", "addmm", "matmul", "conv1d", "embedding"}


def test_a_sloppy_factored_product_is_caught(monkeypatch):
    original = factored.add_rows_times

    def sloppy(target, rows, factors, beta=1):
        return original(target, rows, factors, beta).mul_(1 + 5e-4)

    monkeypatch.setattr(factored, "add_rows_times", sloppy)
    with pytest.raises(AssertionError, match="off by"):
        test_factored_rule_matches_torch_func_jvp(F.linear, RULES[F.linear])


# --- Modules: the fast path takes every matrix's tangent as its factors ----------------------


class Conv1D(nn.Module):
    """GPT-2's Conv1D: y = b + x W with W stored in × out, one torch.addmm."""

    def __init__(self, inputs, outputs):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs) * 0.2)
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x):
        shape = (*x.shape[:-1], self.weight.shape[1])
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


class Mixed(nn.Module):
    """Every factored rule on parameters: embedding, addmm, convolutions (with and without
    groups), matmul with a parameter on either side, linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.project = Conv1D(8, 12)
        self.conv = nn.Conv1d(12, 6, 3, padding=1)
        self.grouped = nn.Conv1d(6, 6, 3, padding=1, groups=2)
        self.right = nn.Parameter(torch.randn(6, 5) * 0.3)
        self.left = nn.Parameter(torch.randn(4, 5) * 0.3)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        h = torch.tanh(self.project(self.embed(tokens)))  # (B, T, 12)
        h = torch.relu(self.conv(h.transpose(1, 2)))  # (B, 6, T)
        h = self.grouped(h).mean(-1)  # (B, 6)
        h = torch.tanh(h @ self.right)  # (B, 5)
        h = torch.tanh((self.left @ h.T).T)  # (B, 4)
        return self.head(h)


def _mixed(dtype=torch.float64):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 20, (4, 7), generator=generator)
    labels = torch.randint(0, 3, (4,), generator=generator)
    return model, lambda: F.cross_entropy(model(tokens), labels)


class FactorsOnly(tg.HeldTangents):
    """Refuses to form a structured tangent whole (the grouped convolution's excepted)."""

    allowed: tuple = ()

    def __call__(self, index):
        if self.factors(index) is not None and self.params[index] not in self.allowed:
            raise AssertionError(f"parameter {index}'s structured tangent was formed whole")
        return super().__call__(index)


@pytest.mark.parametrize(("count", "rank"), [(1, 1), (3, 1), (2, 2)])
def test_the_fast_path_never_forms_a_structured_tangent(count, rank):
    model, closure = _mixed()
    params = list(model.parameters())
    source = FactorsOnly(params, count, "normal", seed=4, rank=rank)
    source.allowed = (model.grouped.weight,)  # groups: x ⊛ V through the whole V (cheaper)
    with torch.no_grad():
        value, tangent, mode = stacked.stacked_derivatives(closure, source)
    assert mode.factored >= 6 and not mode.forward_ad_calls
    given = [
        structured.structured_tangents(p, count, "normal", 4, i, rank) for i, p in enumerate(params)
    ]
    reference = fg.directional_derivatives(
        model, closure, tg.GivenTangents(params, given), fast=False
    )
    torch.testing.assert_close(tangent.reshape(-1), reference.derivatives, rtol=0, atol=1e-12)


def test_a_wrong_factored_product_sends_the_model_to_the_general_path(monkeypatch):
    # The first-use check hands the factors to the rule on the model's own inputs and compares
    # with PyTorch's formula on the tangent they form: a slip of 5e-4 is caught and named.
    original = factored.convolved

    def sloppy(*args, **kwargs):
        return original(*args, **kwargs) * (1 + 5e-4)

    monkeypatch.setattr(factored, "convolved", sloppy)
    model, closure = _mixed()
    estimator = fg.ForwardGradient(rank=1, seed=0)
    with pytest.warns(fg.FallbackWarning, match="rule for conv1d"):
        estimator.estimate(model, closure)
    assert estimator.last_path == "general"
