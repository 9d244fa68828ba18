"""Routes around operations PyTorch cannot differentiate in forward mode: each gives the exact
directional derivative (against autograd along the same tangents), on both paths, in float32
and float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import pack_padded_sequence

import forwardgrad as fg
from forwardgrad.jvp import routes

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def assert_exact(model, closure, dtype, tangents=2):
    params = [p for p in model.parameters() if p.requires_grad]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = closure()
    exact = torch.autograd.grad(loss, params, allow_unused=True)
    exact = torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, exact)]
    )
    source = fg.ForwardGradient(tangents, "rademacher", seed=3).source(params)
    flat = torch.cat([v.reshape(tangents, -1) for v in source.dense()], dim=1)
    expected = flat.to(torch.float64) @ exact.to(torch.float64)
    scale = float(expected.abs().max().clamp_min(1.0))
    for fast in (True, False):
        model.load_state_dict(state)
        result = fg.directional_derivatives(model, closure, source, fast=fast)
        error = float((result.derivatives.double() - expected).abs().max())
        assert error <= TOLERANCE[dtype] * scale, (fast, result.path, result.fallback, error)
        if fast:
            assert result.path == "fast", result.fallback
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_norm(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    x = torch.randn(6, 5, dtype=dtype)
    assert_exact(model, lambda: model(x).pow(2).mean(), dtype)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_weight_norm_route_is_the_same_function(dim):
    v, g = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    if dim == 1:
        g = torch.randn(1, 3, dtype=torch.float64)
    if dim == -1:
        g = torch.randn((), dtype=torch.float64)
    assert torch.allclose(routes.weight_norm(v, g, dim), torch._weight_norm(v, g, dim))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["2d", "offsets", "weights", "padding"])
def test_embedding_bag_route_is_the_same_function(mode, layout):
    torch.manual_seed(0)
    weight = torch.randn(10, 3, dtype=torch.float64)
    options = {"mode": mode}
    if layout == "2d":
        indices, offsets = torch.randint(0, 10, (4, 3)), None
    else:
        indices, offsets = torch.randint(0, 10, (9,)), torch.tensor([0, 2, 2, 6])
    if layout == "weights":
        if mode != "sum":
            pytest.skip("per-sample weights exist only for mode='sum'")
        options["per_sample_weights"] = torch.rand(9, dtype=torch.float64)
    if layout == "padding":
        options["padding_idx"] = int(indices[0])
    expected = F.embedding_bag(indices, weight, offsets, **options)
    assert torch.allclose(routes.embedding_bag(indices, weight, offsets, **options), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_embedding_bag(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(12, 4, mode="mean"), nn.Linear(4, 3)).to(dtype)
    tokens = torch.randint(0, 12, (5, 3))
    y = torch.tensor([0, 1, 2, 1, 0])
    assert_exact(model, lambda: F.cross_entropy(model(tokens), y), dtype)


class Recurrent(nn.Module):
    def __init__(self, cell, packed=False):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.rnn = cell(6, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 11)
        self.packed = packed

    def forward(self, tokens, lengths=None):
        h = self.embed(tokens)
        if self.packed:
            h = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
            _, state = self.rnn(h)
            last = (state[0] if isinstance(state, tuple) else state)[-1]
            return self.head(last)
        out, _ = self.rnn(h)
        return self.head(out)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recurrent_language_models(cell, dtype):
    # float32 LSTMs on the CPU use oneDNN's kernel, which has no forward-mode formula
    torch.manual_seed(0)
    model = Recurrent(cell).to(dtype)
    tokens = torch.randint(0, 11, (3, 7))

    def closure():
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))

    assert_exact(model, closure, dtype)


@pytest.mark.parametrize("batch_first", [True, False])
def test_packing_route_is_the_same_function(batch_first):
    x = torch.randn(4, 6, 3) if batch_first else torch.randn(6, 4, 3)
    lengths = torch.tensor([6, 5, 3, 2])
    data, sizes = routes.pack_padded_sequence(x, lengths, batch_first)
    expected_data, expected_sizes = torch._pack_padded_sequence(x, lengths, batch_first)
    assert torch.equal(data, expected_data) and torch.equal(sizes, expected_sizes)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_packed_sequences(cell):
    torch.manual_seed(0)
    model = Recurrent(cell, packed=True)
    tokens = torch.randint(0, 11, (4, 6))
    lengths = torch.tensor([6, 3, 5, 2])
    y = torch.tensor([1, 2, 3, 4])
    assert_exact(model, lambda: F.cross_entropy(model(tokens, lengths), y), torch.float32)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True},
        {"attn_mask": "float"},
        {"attn_mask": "bool"},
        {"scale": 0.3},
        {"dropout_p": 0.2},
        {"dropout_p": 0.2, "is_causal": True},
        {"enable_gqa": True},
    ],
    ids=lambda o: ",".join(o) or "plain",
)
def test_attention_route_is_the_math_kernel_to_the_bit(options):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.float64) for _ in range(3))
    options = dict(options)
    if options.get("attn_mask") == "float":
        options["attn_mask"] = torch.randn(5, 5, dtype=torch.float64)
    if options.get("attn_mask") == "bool":
        options["attn_mask"] = torch.rand(2, 1, 5, 5) > 0.3
        options["attn_mask"][0, 0, 1] = False  # a row the mask hides entirely
    if options.get("enable_gqa"):
        k, v = k[:, :2], v[:, :2]
    torch.manual_seed(1)
    with sdpa_kernel([SDPBackend.MATH]):
        expected = F.scaled_dot_product_attention(q, k, v, **options)
    torch.manual_seed(1)  # the same dropout mask
    assert torch.equal(routes.scaled_dot_product_attention(q, k, v, **options), expected)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_on_the_fast_path(dropout):
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 3)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).unbind(2)
            h = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, dropout, True
            )
            return self.out(h.transpose(1, 2).reshape(x.shape).mean(1))

    torch.manual_seed(0)
    model = Attention().double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)

    def closure():
        torch.manual_seed(7)  # the same dropout mask for autograd and both paths
        return model(x).pow(2).sum()

    result = assert_exact(model, closure, torch.float64)
    assert result.path == "general"  # assert_exact ends on the general path; the fast one ran
