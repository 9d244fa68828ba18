"""The stacked-tangent evaluation (the fast path) against the general dual-tensor path: the same
tangents give the same derivatives to float rounding, on every kind of model, and the memory
tricks (relu writing over its input's tangent, tangents drawn into .grad) never corrupt one."""

import gc

import pytest
import torch
import torch.nn.functional as F
from derivatives import assert_same_derivatives
from torch import nn

import forwardgrad as fg
from forwardgrad import tangents as tg
from forwardgrad.experiments.problems import make_model
from forwardgrad.jvp import engine
from forwardgrad.jvp import stacked as fp
from forwardgrad.jvp.rules import registry


def stacked(closure, params, count=1, reuse=False):
    """Run the stacked evaluation alone (no check, no fallback)."""
    with torch.no_grad():
        return fp.stacked_derivatives(closure, tg.HeldTangents(params, count, "normal", 0), reuse)


def images(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
@pytest.mark.parametrize("count", [1, 3])
def test_paper_models(name, count):
    torch.manual_seed(0)
    model = make_model(name)
    x, y = images()
    assert_same_derivatives(model, lambda: F.cross_entropy(model(x), y), count, "rademacher")


@pytest.mark.parametrize("count", [1, 2])
def test_batch_slices_give_the_same_result(monkeypatch, count):
    monkeypatch.setattr(registry, "TEMPORARY_BYTES", 2048)  # every convolution and pool sliced
    torch.manual_seed(0)
    model = make_model("cnn")
    x, y = images(batch=5)
    assert_same_derivatives(model, lambda: F.cross_entropy(model(x), y), count)


class Mixed(nn.Module):
    """Most covered operations in one network."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 7 * 7, 16)
        self.out = nn.Linear(16, 10)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = nn.functional.relu(self.bn(self.conv(x)), inplace=True)
        h = F.avg_pool2d(torch.tanh(h), 2)
        h = F.adaptive_avg_pool2d(h, 7).flatten(1)
        h = F.gelu(self.fc(h)) + F.silu(self.fc(h)) * self.scale - torch.sigmoid(h[:, :16]) / 2
        h = F.leaky_relu(h, 0.1).reshape(h.shape[0], 4, 4).transpose(1, 2).reshape(-1, 16)
        h = torch.cat([h, h.exp().sqrt()], dim=1)[:, :16] ** 2
        return F.log_softmax(self.out(F.dropout(h, 0.2, self.training)), dim=1)


@pytest.mark.parametrize("train", [True, False])
def test_mixed_operations_batch_norm_and_dropout(train):
    torch.manual_seed(1)
    model = Mixed().double().train(train)
    x, y = images(batch=5)
    x = x.double()
    assert_same_derivatives(model, lambda: F.nll_loss(model(x), y), 2, atol=1e-9)


class TokenModel(nn.Module):
    """Embedding, layer norms (affine or not, over one or two dims) and tanh-gelu: the
    blocks of a transformer's feed-forward path."""

    def __init__(self, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.plain = nn.LayerNorm([5, 8], elementwise_affine=False)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.norm(self.embed(tokens))
        h = h + F.gelu(self.fc(h), approximate="tanh")
        return self.head(self.plain(h).mean(1))


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("count", [1, 3])
def test_embedding_layer_norm_and_tanh_gelu(padding_idx, count):
    torch.manual_seed(3)
    model = TokenModel(padding_idx).double()
    tokens = torch.randint(0, 11, (4, 5))
    tokens[0, :2] = 0
    y = torch.tensor([0, 1, 2, 1])
    assert_same_derivatives(model, lambda: F.cross_entropy(model(tokens), y), count, atol=1e-9)
    estimator = fg.ForwardGradient(count, "rademacher", seed=0)
    estimator.estimate(model, lambda: F.cross_entropy(model(tokens), y))
    assert estimator.last_path == "fast"  # the fast path ran and agreed with forward AD


def test_embedding_with_max_norm_takes_pytorchs_own_formula():
    # The rule declines (max_norm renormalises the looked-up rows in place); the call then
    # goes through PyTorch's forward-mode formula and still gives the general path's numbers.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Linear(3, 2))
    tokens = torch.tensor([[1, 2], [3, 1]])
    assert_same_derivatives(model, lambda: model(tokens).pow(2).sum(), 1)


def test_losses():
    torch.manual_seed(2)
    model = nn.Linear(5, 3).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, -100, 1, 0, 2, 1])
    target = torch.randn(8, 3, dtype=torch.float64)
    probabilities = torch.softmax(torch.randn(8, 3, dtype=torch.float64), 1)
    closures = [
        lambda: F.cross_entropy(model(x), y),  # ignore_index
        lambda: F.cross_entropy(model(x), y.clamp_min(0), reduction="sum"),
        lambda: F.cross_entropy(model(x), probabilities),
        lambda: F.mse_loss(model(x), target),
        lambda: F.mse_loss(model(x), target, reduction="sum") + model(x).mean(),
        lambda: (model(x) @ model.weight).sum() + (x @ model.weight.T).mean(),
    ]
    for closure in closures:
        assert_same_derivatives(model, closure, 2, atol=1e-10)


def test_named_tensors_are_never_overwritten():
    # relu never writes into its input or a tangent: a tensor the closure still holds stays.
    model = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    kept = {}

    def closure():
        h = model(x)
        kept["copy"], kept["h"] = h.clone(), h
        return torch.relu(h).sum() + F.relu(h).sum() + h.relu().sum() + h.sum()

    stacked(closure, list(model.parameters()), reuse=True)
    assert torch.equal(kept["copy"], kept["h"])
    assert_same_derivatives(model, closure, 2)


def relu_reuse(model, closure, count=1):
    """Run ``closure`` in a mode that may reuse tangents; return (input, output) tangents of
    the first relu, and whether the input's tangent was gone afterwards."""
    params = list(model.parameters())
    mode = fp.StackedTangents(tg.HeldTangents(params, count, "normal", 0), reuse=True)
    seen = {}
    with torch.no_grad(), mode:
        closure(mode, seen)
    try:
        mode.tangent(seen["input"])
        gone = False
    except fp.TangentReused:
        gone = True
    return seen, gone


def test_relu_writes_over_a_tangent_only_its_input_holds():
    model, x = nn.Linear(4, 4), torch.randn(3, 4)

    def closure(mode, seen):
        h = model(x)
        seen["input"], seen["before"] = h, mode.tangent(h).clone()
        seen["tangent_in"] = mode.tangent(h)
        seen["tangent_out"] = mode.tangent(torch.relu(h))

    seen, gone = relu_reuse(model, closure)
    assert gone and seen["tangent_out"] is seen["tangent_in"]
    assert torch.equal(seen["tangent_out"], seen["before"] * (model(x) > 0))


@pytest.mark.parametrize(
    "shared",
    [
        lambda h: h.view(-1),  # a view of h shares its tangent
        lambda h: h.t(),
        lambda h: h + 0,  # the sum's tangent is h's, lifted, when only h carries one
    ],
)
def test_relu_keeps_a_tangent_that_another_tensor_shares(shared):
    model, x = nn.Linear(4, 4), torch.randn(3, 4)

    def closure(mode, seen):
        h = model(x)
        seen["input"], seen["other"] = h, shared(h)
        seen["before"] = mode.tangent(seen["other"]).clone()
        seen["tangent_in"] = mode.tangent(h)
        seen["tangent_out"] = mode.tangent(torch.relu(h))
        seen["after"] = mode.tangent(seen["other"])

    seen, gone = relu_reuse(model, closure)
    assert not gone and seen["tangent_out"] is not seen["tangent_in"]
    assert torch.equal(seen["after"], seen["before"])


def test_relu_never_writes_a_parameter_tangent():
    # K = 1 draws tangents into .grad: relu of a parameter, or of a view of one, must leave
    # them, or the estimate would be scaled garbage.
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x = torch.randn(4, 5)

    def closure():
        return (
            torch.relu(model.weight).sum()
            + torch.relu(model.bias.view(3, 1)).sum()
            + (torch.relu(model(x)).sum())
        )

    fast = fg.ForwardGradient(1, "normal", seed=2)
    slow = fg.ForwardGradient(1, "normal", seed=2, fast=False)
    fast.estimate(model, closure)
    grads = [p.grad.clone() for p in model.parameters()]
    slow.estimate(model, closure)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=0, atol=1e-6 * p.grad.abs().max().item())


@pytest.mark.parametrize("source", ["grad", "drawn"])
def test_parameter_tangent_storages_are_guarded_while_they_live(source):
    # .grad (K = 1) lives on after the step's view of it dies, and stays guarded; a drawn
    # tangent is freed after its layer, and its address, which a later activation's tangent
    # may reuse, is no longer guarded then.
    model = nn.Linear(4, 4)
    params = list(model.parameters())
    if source == "grad":
        tangents = tg.GradTangents(params, "normal", 0)
    else:
        tangents = tg.DrawnTangents(params, 1, "normal", 0)
    mode = fp.StackedTangents(tangents, reuse=True)
    pointer = mode.tangent(model.weight).untyped_storage().data_ptr()
    gc.collect()
    alive = mode._parameter_storages[pointer]() is not None
    assert alive == (source == "grad")


class ReusesReluInput(nn.Module):
    """relu(h) and then h again, with batch statistics and dropout in between: the first run
    overwrites h's tangent, the rerun must see the same buffers and dropout mask."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 26 * 26, 10)

    def forward(self, x):
        h = self.bn(self.conv(x))
        y = F.dropout(torch.relu(h), 0.3, self.training) + 0.5 * h
        return self.head(y.flatten(1))


@pytest.mark.parametrize("count", [1, 3])
def test_a_relu_input_used_again_reruns_the_closure_without_reuse(count):
    torch.manual_seed(0)
    model = ReusesReluInput()
    x, y = images(batch=4)
    assert model not in engine._STATES
    assert_same_derivatives(model, lambda: F.cross_entropy(model(x), y), count)
    assert engine._STATES[model].keeps_relu_inputs  # from then on, no reuse


def test_relu_input_used_again_through_estimate():
    torch.manual_seed(0)
    x, y = images(batch=4)
    model = ReusesReluInput()
    reference = ReusesReluInput()
    reference.load_state_dict(model.state_dict())
    fast = fg.ForwardGradient(1, "rademacher", seed=5)
    slow = fg.ForwardGradient(1, "rademacher", seed=5, fast=False)
    for step in range(2):
        torch.manual_seed(step)  # the same dropout masks for both
        fast_loss = fast.estimate(model, lambda: F.cross_entropy(model(x), y))
        torch.manual_seed(step)
        slow_loss = slow.estimate(reference, lambda: F.cross_entropy(reference(x), y))
        assert torch.allclose(fast_loss, slow_loss)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-5 * q.grad.abs().max().item())
        for b, c in zip(model.buffers(), reference.buffers()):
            assert torch.allclose(b.float(), c.float(), atol=1e-6)
    # the fast path ran (with dropout, checked against the general path on the same masks),
    # and had to rerun the closure without the reuse
    assert fast.last_path == "fast" and slow.last_path == "general"
    assert engine._STATES[model].keeps_relu_inputs


class RebindsBuffers(nn.Module):
    """Buffers rebound by forward (self.ema = ...), not updated in place, and relu's input read
    again: the rerun must start from the original buffer objects."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)
        self.register_buffer("ema", torch.zeros(7))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = self.a(x)
        self.ema = 0.5 * self.ema + 0.5 * h.detach().mean(0)
        self.calls = self.calls + 1
        return self.b(torch.relu(h) + h)


@pytest.mark.parametrize("optimizer", ["estimate", "forward-sgd"])
def test_rebound_buffers_are_updated_once_per_step(optimizer):
    torch.manual_seed(0)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    model, reference = RebindsBuffers(), RebindsBuffers()
    reference.load_state_dict(model.state_dict())
    if optimizer == "estimate":
        fast = fg.ForwardGradient(1, seed=1)
        slow = fg.ForwardGradient(1, seed=1, fast=False)
        step_fast = lambda: fast.estimate(model, lambda: F.cross_entropy(model(x), y))  # noqa: E731
        step_slow = lambda: slow.estimate(reference, lambda: F.cross_entropy(reference(x), y))  # noqa: E731
    else:
        fast = fg.ForwardSGD(model, 0.1, seed=1)
        slow = fg.ForwardSGD(reference, 0.1, seed=1, fast=False)
        step_fast = lambda: fast.step(lambda: F.cross_entropy(model(x), y))  # noqa: E731
        step_slow = lambda: slow.step(lambda: F.cross_entropy(reference(x), y))  # noqa: E731
    for step in range(1, 3):
        step_fast()
        step_slow()
        assert int(model.calls) == int(reference.calls) == step
        assert torch.allclose(model.ema, reference.ema, atol=1e-6)


def test_an_operation_without_a_rule_takes_pytorchs_formula_on_the_fast_path():
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    closure = lambda: model(torch.ones(1, 3)).abs().sum()  # noqa: E731
    value, tangent, mode = stacked(closure, params)
    assert mode.forward_ad_calls == {"abs": 1}
    assert_same_derivatives(model, closure, 3)


def test_a_custom_function_inside_the_closure_stops_the_fast_path():
    class Doubled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

        @staticmethod
        def jvp(ctx, tangent):
            return 2 * tangent

    model = nn.Linear(3, 2)
    with pytest.raises(fp.Unsupported, match="custom torch.autograd.Function"):
        stacked(lambda: Doubled.apply(model(torch.ones(1, 3))).sum(), list(model.parameters()))


# --- Through ForwardGradient.estimate ----------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "distribution", "combine"),
    [
        (1, "normal", "mean"),
        (1, "rademacher", "projection"),
        (3, "normal", "projection"),
        (4, "rademacher", "mean"),
    ],
)
def test_estimate_matches_the_general_path(count, distribution, combine):
    torch.manual_seed(0)
    model = make_model("mlp")
    x, y = images(batch=4)

    def closure():
        return F.cross_entropy(model(x), y)

    fast = fg.ForwardGradient(count, distribution, combine, seed=3)
    slow = fg.ForwardGradient(count, distribution, combine, seed=3, fast=False)
    for _ in range(2):  # the second step reuses the .grad and tangent buffers
        fast.estimate(model, closure)
        fast_grads = [p.grad.clone() for p in model.parameters()]
        slow.estimate(model, closure)
        for p, g in zip(model.parameters(), fast_grads):  # float32 rounding of sums
            assert torch.allclose(g, p.grad, rtol=0, atol=1e-5 * p.grad.abs().max().item())
    assert fast.last_path == "fast" and fast.last_fallback is None


def test_k1_draws_into_the_existing_grad():
    model = nn.Linear(3, 2)
    estimator = fg.ForwardGradient(seed=0)
    closure = lambda: model(torch.ones(2, 3)).sum()  # noqa: E731
    estimator.estimate(model, closure)
    pointers = [p.grad.data_ptr() for p in model.parameters()]
    estimator.estimate(model, closure)
    assert [p.grad.data_ptr() for p in model.parameters()] == pointers


class TorchScripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.last = nn.Linear(3, 4), nn.Linear(4, 1)
        self.activation = torch.jit.script(lambda_tanh)

    def forward(self, x):
        return self.last(self.activation(self.first(x)))


def lambda_tanh(h: torch.Tensor) -> torch.Tensor:
    return torch.tanh(h) * 2.0


def test_a_model_the_fast_path_cannot_see_falls_back_with_the_same_estimate():
    torch.manual_seed(0)
    model = TorchScripted()
    x = torch.randn(5, 3)

    def closure():
        return model(x).pow(2).mean()

    fast = fg.ForwardGradient(2, seed=4)
    slow = fg.ForwardGradient(2, seed=4, fast=False)
    for step in range(3):
        if step == 0:
            with pytest.warns(fg.FallbackWarning, match="differ from PyTorch's forward-mode AD"):
                fast.estimate(model, closure)
            assert fast.last_path == "general" and "TorchScript" in fast.last_fallback
        else:
            fast.estimate(model, closure)
        grads = [p.grad.clone() for p in model.parameters()]
        slow.estimate(model, closure)
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert fast.last_path == "general"


def test_parameters_unused_by_the_loss_get_their_tangent_too():
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1)})
    closure = lambda: model["used"](torch.ones(2, 3)).sum()  # noqa: E731
    fast = fg.ForwardGradient(seed=5)
    slow = fg.ForwardGradient(seed=5, fast=False)
    fast.estimate(model, closure)
    grads = [p.grad.clone() for p in model.parameters()]
    slow.estimate(model, closure)
    assert all(torch.allclose(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert model["unused"].weight.grad.abs().sum() > 0
