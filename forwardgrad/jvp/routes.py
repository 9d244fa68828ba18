"""Routes around operations that PyTorch cannot differentiate in forward mode.

Both derivative paths evaluate with ``forward_mode_context()`` and look every call up in
``COMPOSITES`` and ``CONTEXTS`` first:

- attention goes to the math kernel of ``scaled_dot_product_attention`` (the fused CPU and
  CUDA kernels have no forward-mode formula), and ``nn.MultiheadAttention``'s fused inference
  path is switched off;
- recurrent layers (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu``) run
  with oneDNN off, whose ``mkldnn_rnn_layer`` kernel has no formula (PyTorch's own cells do);
- ``torch._weight_norm`` (``weight_norm`` parametrisations) is computed as v·g/‖v‖;
- ``F.embedding_bag`` is computed as an embedding lookup followed by a reduction per bag;
- packing a padded batch of sequences (``pack_padded_sequence``) is computed by slicing and
  concatenating the time steps;
- ``scaled_dot_product_attention`` is computed as its math kernel computes it, op for op (the
  same numbers and the same dropout mask), so that on the fast path the K tangents go through
  the matrix products, softmax and dropout together instead of one call per tangent.

Each route computes the same function as the operation it replaces (tested against autograd).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

try:  # The math kernel is the one attention kernel with forward-mode formulas on every device.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _attention_with_forward_ad() -> contextlib.AbstractContextManager:
        return sdpa_kernel([SDPBackend.MATH])

except ImportError:  # pragma: no cover - older torch

    def _attention_with_forward_ad() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@contextlib.contextmanager
def _without_mha_fastpath() -> Iterator[None]:
    # nn.MultiheadAttention's inference fast path is a fused kernel with no forward-mode formula.
    backend = getattr(torch.backends, "mha", None)
    if backend is None:
        yield
        return
    enabled = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def forward_mode_context() -> Iterator[None]:
    """No graph, attention on the math kernel, no fused MHA path: where both paths evaluate."""
    with torch.no_grad(), _attention_with_forward_ad(), _without_mha_fastpath():
        yield


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """w = g · v / ‖v‖, the norm over every dimension but ``dim`` (all of them for dim = -1)."""
    if dim == -1:
        return v * (g / v.norm())
    dims = [d for d in range(v.dim()) if d != dim % v.dim()]
    return v * (g / v.norm(2, dim=dims, keepdim=True))


def embedding_bag(
    input: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """``F.embedding_bag`` as ``F.embedding`` and a sum, mean or max per bag."""
    if max_norm is not None:
        raise NotImplementedError("embedding_bag with max_norm has no forward-mode route")
    if input.dim() == 2:
        bags = torch.arange(input.shape[0], device=input.device).repeat_interleave(input.shape[1])
        count, indices = input.shape[0], input.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    else:
        starts = offsets[:-1] if include_last_offset else offsets
        count, indices = starts.numel(), input
        lengths = torch.diff(torch.cat([starts, starts.new_tensor([input.numel()])]))
        bags = torch.arange(count, device=input.device).repeat_interleave(lengths)
    rows = F.embedding(indices, weight)
    keep = torch.ones_like(indices, dtype=torch.bool)
    if padding_idx is not None:
        keep = indices != padding_idx % weight.shape[0]
    rows = rows * keep.unsqueeze(1).to(rows.dtype)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(1)
    out = rows.new_zeros((count, weight.shape[1]))
    if mode == "max":
        filled = torch.where(keep.unsqueeze(1), rows, torch.full_like(rows, float("-inf")))
        out = out.index_reduce(0, bags, filled, "amax", include_self=False)
        return torch.where(torch.isinf(out), torch.zeros_like(out), out)
    out = out.index_add(0, bags, rows)
    if mode == "mean":
        sizes = torch.zeros(count, dtype=rows.dtype, device=rows.device)
        sizes = sizes.index_add(0, bags, keep.to(rows.dtype))
        out = out / sizes.clamp_min(1).unsqueeze(1)
    return out


def pack_padded_sequence(
    input: torch.Tensor, lengths: torch.Tensor, batch_first: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch._pack_padded_sequence``: the time steps of sequences sorted by decreasing length,
    each cut to the sequences still running, one after another; and how many run at each."""
    steps = input.transpose(0, 1) if batch_first else input
    lengths = lengths.to("cpu", torch.int64)
    if lengths.numel() and bool((lengths[:-1] < lengths[1:]).any()):
        raise ValueError("lengths must be sorted in decreasing order (enforce_sorted)")
    batch_sizes = torch.stack([(lengths > t).sum() for t in range(int(lengths[0]))])
    data = torch.cat([steps[t, : int(n)] for t, n in enumerate(batch_sizes)])
    return data, batch_sizes


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v, with dropout on the weights, as the math kernel does it:
    q and k each scaled by √scale, a boolean mask turned into 0 / −inf, grouped keys and
    values repeated, rows that the mask hides entirely given weight 0."""
    length, source = query.shape[-2], key.shape[-2]
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    factor = math.sqrt(abs(scale))
    query = query * (-factor if scale < 0 else factor)
    if is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.where(attn_mask.logical_not(), float("-inf"), 0.0).to(query.dtype)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeats, -3)
        value = value.repeat_interleave(repeats, -3)
    weights = torch.matmul(query, key.transpose(-2, -1) * factor)
    if attn_mask is not None:
        weights = weights + attn_mask
        hidden = torch.isinf(weights).all(-1, keepdim=True)
    weights = torch.softmax(weights, -1)
    if attn_mask is not None and bool(hidden.any()):
        weights = torch.where(hidden, 0.0, weights)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, True)
    return torch.matmul(weights, value)


# Operations computed by a composite of differentiable operations instead.
COMPOSITES: dict[Callable, Callable] = {
    torch._weight_norm: weight_norm,
    F.embedding_bag: embedding_bag,
    torch._pack_padded_sequence: pack_padded_sequence,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
}

# Operations that need another kernel: the context to call them in.
CONTEXTS: dict[Callable, Callable[[], contextlib.AbstractContextManager]] = {}
for _name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
    _function = getattr(torch, _name, None)
    if _function is not None:
        CONTEXTS[_function] = lambda: torch.backends.mkldnn.flags(enabled=False)
