"""Every registered stacked-tangent rule, under every spelling, against torch.func.jvp.

The rule table is the test table: each rule names its sample inputs when it is registered, so a
rule without a test cannot exist. For each spelling and sample, two tangents are pushed through
the rule at once (K = 2) and each must equal the Jacobian-vector product that torch.func.jvp
computes for it, in float64.
"""

import math
import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import tree_flatten, tree_unflatten

from forwardgrad import tangents as tg
from forwardgrad.jvp import stacked
from forwardgrad.jvp.rules import REGISTERED, RULES

CASES = [
    pytest.param(f, rule, id=f"{rule.name}:{getattr(f, '__qualname__', f)}")
    for f, rule in RULES.items()
]


def _constant(rule, position, key) -> bool:
    return position in rule.constant or key in rule.constant


def _carrying(rule, args, kwargs):
    """Flattened sample, and the flat positions of the floating tensors that carry tangents."""
    flat, spec = tree_flatten((args, kwargs))
    positions = []
    for i, value in enumerate(flat):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            continue
        position = i if i < len(tree_flatten(args)[0]) else None
        key = next((k for k, v in kwargs.items() if v is value), None)
        if not _constant(rule, position, key):
            positions.append(i)
    return flat, spec, positions


def _rule_outputs(func, flat, spec, positions, tangents):
    """The rule's outputs and their stacked tangents, the inputs tracked like activations."""
    mode = stacked.StackedTangents(tg.GivenTangents([], [torch.zeros(2)]))
    inputs = [v.clone() if isinstance(v, torch.Tensor) else v for v in flat]
    for i, t in zip(positions, tangents):
        mode.track(inputs[i], t.clone(), fresh=True)
    args, kwargs = tree_unflatten(inputs, spec)
    torch.manual_seed(0)  # random rules (dropout) draw the mask the reference draws
    with torch.no_grad(), mode:
        out = func(*args, **kwargs)
    outs = tree_flatten(out)[0]
    return outs, [mode.tangent(o) for o in outs], mode


def _reference(func, flat, spec, positions, tangents, k):
    """torch.func.jvp along tangent k (the tensors that carry no tangent are constants)."""
    primals = tuple(flat[i].clone() for i in positions)
    directions = tuple(t[k] for t in tangents)

    def f(*values):  # fresh constants each call: batch norm updates its statistics in place
        full = [v.clone() if isinstance(v, torch.Tensor) else v for v in flat]
        for i, value in zip(positions, values):
            full[i] = value
        args, kwargs = tree_unflatten(full, spec)
        return func(*args, **kwargs)

    floats = [v for v in flat if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if len(floats) > len(positions):
        # Floating constants (running statistics) that the op may update in place: jvp refuses
        # that for captured tensors, so take PyTorch's formulas through dual tensors directly.
        return _dual_reference(f, primals, directions)
    torch.manual_seed(0)
    return torch.func.jvp(f, primals, directions)


def _dual_reference(f, primals, directions):
    torch.manual_seed(0)
    with fwAD.dual_level(), torch.no_grad():  # as the general path evaluates
        outputs = f(*(fwAD.make_dual(p, d) for p, d in zip(primals, directions)))
        flat, spec = tree_flatten(outputs)
        unpacked = [fwAD.unpack_dual(o) if isinstance(o, torch.Tensor) else (o, None) for o in flat]
    return tree_unflatten([p for p, _ in unpacked], spec), tree_unflatten(
        [t for _, t in unpacked], spec
    )


def _accepts(func, args, kwargs) -> bool:
    """Does this spelling take this sample at all (``mm`` takes no batch, ``__rsub__`` no
    alpha)? Samples are shared by a rule's spellings."""
    flat, spec = tree_flatten((args, kwargs))
    args, kwargs = tree_unflatten(
        [v.clone() if isinstance(v, torch.Tensor) else v for v in flat], spec
    )
    try:
        return func(*args, **kwargs) is not NotImplemented
    except (TypeError, RuntimeError, ValueError, IndexError):
        return False


@pytest.mark.parametrize(("func", "rule"), CASES)
def test_rule_matches_torch_func_jvp(func, rule):
    samples = [(a, k) for a, k in rule.samples(torch.float64) if _accepts(func, a, k)]
    assert samples, f"no sample of the rule for {rule.name} suits {func}"
    for args, kwargs in samples:
        flat, spec, positions = _carrying(rule, args, kwargs)
        assert positions, f"a sample of {rule.name} has no input that carries a tangent"
        generator = torch.Generator().manual_seed(1)
        tangents = [
            torch.randn((2, *flat[i].shape), dtype=flat[i].dtype, generator=generator)
            for i in positions
        ]
        outs, out_tangents, mode = _rule_outputs(func, flat, spec, positions, tangents)
        assert not mode.forward_ad_calls, f"{rule.name} declined its own sample {args, kwargs}"
        for k in range(2):
            value, tangent = _reference(func, flat, spec, positions, tangents, k)
            values, references = tree_flatten(value)[0], tree_flatten(tangent)[0]
            for out, t, v, ref in zip(outs, out_tangents, values, references):
                if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
                    continue
                torch.testing.assert_close(out, v)
                expected = torch.zeros_like(out) if ref is None else ref
                got = torch.zeros_like(out) if t is None else t[k]
                # float64, but PyTorch's own formulas use a few float32 constants (hardsigmoid's
                # 1/6): 1e-7 of the scale, far below the 5e-4 slip the last test plants.
                tolerance = 1e-7 if out.dtype == torch.float64 else 1e-5
                scale = max(1.0, float(expected.abs().max()) if expected.numel() else 0.0)
                assert torch.allclose(got, expected, rtol=0, atol=tolerance * scale), (
                    f"{rule.name} ({rule.formula}) is off by "
                    f"{float((got - expected).abs().max()):.3g} on {args, kwargs}"
                )


def test_every_rule_states_its_formula():
    for rule in REGISTERED:  # "y = f(x):  ẏ = f'(x) ẋ"
        assert re.search(r"=.*:\s+\S+ = ", rule.formula), f"{rule.name}: {rule.formula!r}"


def test_every_spelling_of_an_operator_is_registered():
    for name, spellings in [
        ("add", [torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__]),
        ("sub", [torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__]),
        ("mul", [torch.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__]),
        ("div", [torch.div, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__]),
        ("matmul", [torch.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__]),
        ("relu", [torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_]),
    ]:
        for f in spellings:
            assert f in RULES and RULES[f].name == name, f


def test_a_sloppy_rule_is_caught():
    # A rule off by a tiny relative amount must fail the comparison this test makes.
    rule = RULES[torch.tanh]
    original = rule.apply

    def sloppy(mode, func, x):
        out = original(mode, func, x)
        tangent = mode.tangent(out)
        mode.track(out, tangent * (1 + 5e-4))
        return out

    rule.apply = sloppy
    try:
        with pytest.raises(AssertionError, match="off by"):
            test_rule_matches_torch_func_jvp(torch.tanh, rule)
    finally:
        rule.apply = original
    assert math.isfinite(0.0)
