"""In-place operations on the fast path: the value and its tangent are written back into the
mutated tensor, and the views that share its memory see the change, as PyTorch's dual tensors do.
Every case is checked against the general path on the same tangents."""

import pytest
import torch
import torch.nn.functional as F
from derivatives import assert_same_derivatives
from torch import nn

import forwardgrad as fg
from forwardgrad import tangents as tg


class InPlace(nn.Module):
    """A linear layer followed by one in-place edit of its output."""

    def __init__(self, edit):
        super().__init__()
        self.first, self.other, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)
        self.edit = edit

    def forward(self, x):
        h = self.first(x)
        h = self.edit(h, self.other(x))
        return self.head(torch.tanh(h))


def _iadd(h, o):
    h += o
    return h


def _imul_view(h, o):
    h[:, :2].mul_(3.0)  # through a view: h's tangent changes in those columns
    return h


def _set_slice(h, o):
    h[:, 1:3] = o[:, :2]
    return h


def _set_constant(h, o):
    h[:, 0] = 0.5
    return h


def _clamp(h, o):
    return h.clamp_(min=-0.2)  # no rule: PyTorch's formula, written back


def _masked_fill(h, o):
    return h.masked_fill_(o > 0, 0.0)


def _relu_inplace_sum(h, o):
    out = F.relu(h, inplace=True)
    out += o  # a residual block's "out += identity"
    return out


def _copy_into_constant(h, o):
    buffer = torch.zeros_like(h)
    before = buffer[:, 1]  # a view taken before the buffer carries a tangent
    buffer.copy_(o)
    return h + before.unsqueeze(1) * buffer


def _fill_view(h, o):
    h[:, 0].fill_(1.0)
    h[:, 1].zero_()
    return h


EDITS = [
    _iadd,
    _imul_view,
    _set_slice,
    _set_constant,
    _clamp,
    _masked_fill,
    _relu_inplace_sum,
    _copy_into_constant,
    _fill_view,
]


@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("count", [1, 3])
def test_in_place_edits_match_the_general_path(edit, count):
    torch.manual_seed(0)
    model = InPlace(edit).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_same_derivatives(model, lambda: model(x).pow(2).sum(), count, atol=1e-9)


def test_an_in_place_edit_of_a_parameter_leaves_the_fast_path():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)

    def closure():
        model.bias.mul_(1.0)  # harmless, but a parameter written inside the closure
        return model(x).sum()

    estimator = fg.ForwardGradient(seed=0)
    with pytest.warns(fg.FallbackWarning, match="in-place operation on a parameter"):
        try:
            estimator.estimate(model, closure)
        except fg.ForwardGradError:
            pass  # the general path may refuse it too; what matters is that it is not fast
    assert estimator.last_path in (None, "general")


def test_a_tensor_read_after_relu_reused_its_tangent_is_an_error_not_a_wrong_number():
    from forwardgrad.jvp import stacked

    model = nn.Linear(4, 4)
    params = list(model.parameters())
    mode = stacked.StackedTangents(tg.HeldTangents(params, 1, "normal", 0), reuse=True)
    with torch.no_grad(), mode:
        h = model(torch.randn(3, 4))
        torch.relu(h)
        with pytest.raises(stacked.TangentReused):
            mode.tangent(h)
