"""Forward gradients through real-world modules, checked against exact autograd gradients.

For each model the K directional derivatives that forward-mode AD gives must equal vᵀ∇L with
∇L from backprop, under the same Dropout mask and BatchNorm state.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardgrad as fg
from forwardgrad.estimators import EstimatorError

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}


def check_directional_derivatives(model, closure, dtype, tangents=3, seed=0):
    """Assert that the forward-mode derivatives match backprop, with identical randomness."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(seed)
    fg.Backprop().estimate(model, closure)
    exact = torch.cat([p.grad.reshape(-1) for p in params])
    model.load_state_dict(state)

    source = fg.ForwardGradient(tangents, seed=seed).source(params)
    flat = torch.cat([v.reshape(tangents, -1) for v in source.dense()], dim=1)
    expected = flat.to(exact.dtype) @ exact
    scale = expected.abs().max().clamp_min(1.0)
    for fast in (True, False):  # the fast path (where it runs) and the general path
        model.load_state_dict(state)
        torch.manual_seed(seed)
        derivatives = fg.directional_derivatives(model, closure, source, fast=fast).derivatives
        assert torch.allclose(derivatives, expected, rtol=0, atol=TOLERANCE[dtype] * scale.item())
    return derivatives


class Attention(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, tokens):
        h = self.embed(tokens if self.batch_first else tokens.T)
        a, _ = self.attention(h, h, h, need_weights=False)
        h = self.norm(h + a)
        return self.head(h.mean(1 if self.batch_first else 0))


class ScaledDotProduct(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).unbind(2)
        h = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(h.transpose(1, 2).reshape(x.shape).mean(1))


class TiedLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(13, 6)
        self.mix = nn.Linear(6, 6)
        self.unembed = nn.Linear(6, 13, bias=False)
        self.unembed.weight = self.embed.weight  # tied

    def forward(self, tokens):
        return self.unembed(torch.tanh(self.mix(self.embed(tokens))))


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("scale", torch.tensor([0.5, 2.0, -1.0]))

    def forward(self, x):
        return self.linear(x) * self.scale


def classification(model, inputs, classes=3, seed=1):
    y = torch.randint(0, classes, (inputs.shape[0],), generator=torch.Generator().manual_seed(seed))
    return lambda: F.cross_entropy(model(inputs), y)


def _images(shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype)


CASES = {
    "activations": lambda dt: nn.Sequential(
        nn.Linear(5, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.GELU(),
        nn.Linear(6, 6),
        nn.SiLU(),
        nn.Linear(6, 6),
        nn.Softplus(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ),
    "conv1d_pooling": lambda dt: nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 4, 3),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.Linear(4 * 2, 3),
    ),
    "conv2d_pooling": lambda dt: nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3),
        nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ),
    "layernorm": lambda dt: nn.Sequential(
        nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)
    ),
}
INPUTS = {
    "activations": (8, 5),
    "conv1d_pooling": (8, 2, 12),
    "conv2d_pooling": (8, 1, 8, 8),
    "layernorm": (8, 5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layers(case, dtype):
    torch.manual_seed(0)
    model = CASES[case](dtype).to(dtype)
    check_directional_derivatives(model, classification(model, _images(INPUTS[case], dtype)), dtype)


@pytest.mark.parametrize("tangents", [1, 4])
@pytest.mark.parametrize("bn", ["1d", "2d"])
def test_batchnorm_in_train_mode_updates_statistics_once(bn, tangents):
    torch.manual_seed(0)
    if bn == "1d":
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
        x = _images((8, 5), torch.float64)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 36, 3)
        )
        x = _images((8, 1, 8, 8), torch.float64)
    model = model.double().train()
    closure = classification(model, x)
    check_directional_derivatives(model, closure, torch.float64, tangents)

    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)  # one ordinary forward
    fg.ForwardGradient(tangents, seed=3).estimate(model, closure)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("tangents", [1, 4])
def test_dropout_shares_one_mask_between_value_and_tangents(tangents):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3)).double()
    closure = classification(model, _images((8, 5), torch.float64))
    # Equal to backprop under the same mask: every tangent saw the mask the value saw.
    check_directional_derivatives(model, closure, torch.float64, tangents)
    # And the global RNG advanced exactly as one ordinary forward would.
    torch.manual_seed(9)
    closure()
    after_forward = torch.get_rng_state()
    torch.manual_seed(9)
    fg.ForwardGradient(tangents, seed=0).estimate(model, closure)
    assert torch.equal(torch.get_rng_state(), after_forward)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(mode, batch_first):
    torch.manual_seed(0)
    model = getattr(Attention(batch_first).double(), mode)()
    tokens = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(3))
    check_directional_derivatives(model, classification(model, tokens), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_dot_product_attention_routes_to_a_kernel_with_forward_ad(dtype):
    torch.manual_seed(0)
    model = ScaledDotProduct().to(dtype)
    check_directional_derivatives(model, classification(model, _images((4, 6, 8), dtype)), dtype)


def test_tied_weights_get_one_tangent():
    torch.manual_seed(0)
    model = TiedLanguageModel().double()
    assert len(list(model.parameters())) == 3  # tied weight counted once
    tokens = torch.randint(0, 13, (6, 4), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 13, (6, 4), generator=torch.Generator().manual_seed(2))

    def closure():
        return F.cross_entropy(model(tokens).reshape(-1, 13), targets.reshape(-1))

    check_directional_derivatives(model, closure, torch.float64)
    assert model.unembed.weight is model.embed.weight


def test_buffers_and_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(WithBuffer(), nn.BatchNorm1d(3)).double().eval()
    check_directional_derivatives(
        model, classification(model, _images((8, 4), torch.float64)), torch.float64
    )


class _GridSample(nn.Module):
    """Resamples its input on a fixed grid: grid_sampler_2d has no forward-mode formula."""

    def __init__(self):
        super().__init__()
        self.register_buffer("grid", torch.rand(1, 3, 3, 2) * 2 - 1)

    def forward(self, x):
        grid = self.grid.expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=False).flatten(1)


def test_unsupported_operation_names_the_op_and_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), _GridSample(), nn.Linear(18, 3))
    closure = classification(model, torch.randn(5, 1, 6, 6))
    with pytest.raises(EstimatorError, match=r"'grid_sampler_2d' in module 1 \(_GridSample\)"):
        fg.ForwardGradient(seed=0).estimate(model, closure)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    # The same model works with the other estimators.
    fg.Backprop().estimate(model, closure)
    fg.ZerothOrder(seed=0).estimate(model, closure)


class _DoubleNoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class _CustomBlock(nn.Module):
    def forward(self, x):
        return _DoubleNoJvp.apply(x)


def test_custom_function_without_jvp_is_named():
    model = nn.Sequential(nn.Linear(4, 3), _CustomBlock())
    closure = classification(model, torch.randn(5, 4))
    with pytest.raises(
        EstimatorError, match=r"custom torch.autograd.Function in module 1 \(_CustomBlock\)"
    ):
        fg.ForwardGradient(seed=0).estimate(model, closure)
