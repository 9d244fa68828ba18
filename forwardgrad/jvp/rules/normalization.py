"""Rules for batch and layer normalisation: y = x̂ γ + β with x̂ = (x − μ) / σ.

With statistics computed from x (batch norm in training, layer norm always) μ and σ move with
x, so the tangent of x̂ is (ẋ − mean ẋ − x̂ · mean(ẋ x̂)) / σ over the normalised dimensions; with
running statistics (batch norm in evaluation) it is ẋ / σ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forwardgrad.jvp.rules.registry import Decline, lift, randn, rule


def normalization_tangent(tx, tw, tb, normalized, factors, moving_dims):
    """The tangent of y = x̂ γ + β, x̂ = (x − μ) / σ: ẋ · γ/σ plus ẇ x̂ + ḃ.

    ``factors`` multiply ẋ (1/σ, and γ when there is one), each shaped to broadcast; ``tw`` and
    ``tb`` are the affine tangents shaped to broadcast (None: constant). With ``moving_dims``,
    μ and σ are x's statistics over those dims and move with it, so ẋ first loses its mean and
    its component along x̂ there: ẋ − mean ẋ − x̂ mean(ẋ x̂) (x̂ sums to 0 there, so ẋ need not
    be centred before the product). Written as a few in-place passes over the activation."""
    tangent = None
    if tx is not None:
        if moving_dims is not None:
            tdims = [d + 1 for d in moving_dims]
            tangent = tx - tx.mean(tdims, keepdim=True)
            tangent.addcmul_(normalized, (tx * normalized).mean(tdims, keepdim=True), value=-1)
        else:
            tangent = tx
        for factor in factors:
            tangent = tangent * factor if tangent is tx else tangent.mul_(factor)
    if tw is not None:
        tangent = tw * normalized if tangent is None else tangent.addcmul_(tw, normalized)
    if tb is not None:
        tangent = tb if tangent is None else tangent.add_(tb)
    return tangent


def _batch_norm_samples(dtype):
    x = randn(4, 3, 5, 5, dtype=dtype)
    mean, var = randn(3, dtype=dtype), randn(3, dtype=dtype, positive=True)
    weight, bias = randn(3, dtype=dtype), randn(3, dtype=dtype)
    yield (x, mean.clone(), var.clone(), weight, bias, True), {}
    yield (x, mean.clone(), var.clone(), weight, bias, False), {}
    yield (randn(6, 3, dtype=dtype), mean.clone(), var.clone()), {"training": True}


@rule("batch_norm", samples=_batch_norm_samples, owners=(F,), constant=(1, 2))
def batch_norm(
    mode, func, x, running_mean, running_var, weight=None, bias=None, training=False, **options
):
    """y = x̂ γ + β:  ẏ = γ/σ (ẋ − mean ẋ − x̂ mean(ẋ x̂)) + γ̇ x̂ + β̇ in training (batch
    statistics), γ/σ ẋ + γ̇ x̂ + β̇ with running statistics."""
    if mode.carries((running_mean, running_var)):
        raise Decline("batch norm with statistics that carry tangents")
    momentum, eps = options.get("momentum", 0.1), options.get("eps", 1e-5)
    use_batch = bool(training)  # (evaluation without running statistics: func refuses it)
    if use_batch:  # the kernel F.batch_norm runs, which also gives the batch statistics
        out, mean, inv_std = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
    else:
        out = func(x, running_mean, running_var, weight, bias, training, momentum, eps)
        mean, inv_std = running_mean, torch.rsqrt(running_var + eps)
    tx, tw, tb = mode.tangent(x), mode.tangent(weight), mode.tangent(bias)
    count, channel_shape = mode.count, [1, -1] + [1] * (x.dim() - 2)
    mean, inv_std = mean.view(channel_shape), inv_std.view(channel_shape)
    normalized = (x - mean) * inv_std
    scale = inv_std if weight is None else inv_std * weight.view(channel_shape)  # per channel
    tangent = normalization_tangent(
        tx,
        None if tw is None else tw.view(count, *channel_shape),
        None if tb is None else tb.view(count, *channel_shape),
        normalized,
        [scale],
        [0] + list(range(2, x.dim())) if use_batch else None,  # batch statistics move with x
    )
    return mode.track(out, tangent, fresh=tx is not None or tw is not None)


def _layer_norm_samples(dtype):
    x = randn(2, 3, 6, dtype=dtype)
    yield (x, (6,), randn(6, dtype=dtype), randn(6, dtype=dtype)), {}
    yield (x, (3, 6)), {}
    yield (x, [6]), {"weight": randn(6, dtype=dtype), "eps": 1e-3}


@rule("layer_norm", samples=_layer_norm_samples, owners=(F,))
def layer_norm(mode, func, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """y = x̂ γ + β over the last dimensions:  ẏ = γ/σ (ẋ − mean ẋ − x̂ mean(ẋ x̂)) + γ̇ x̂ + β̇."""
    # The kernel F.layer_norm runs, which also gives the statistics it normalised with.
    out, mean, inv_std = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
    tx, tw, tb = mode.tangent(x), mode.tangent(weight), mode.tangent(bias)
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    normalized = (x - mean) * inv_std
    tangent = normalization_tangent(
        tx,
        None if tw is None else lift(tw, x.dim()),
        None if tb is None else lift(tb, x.dim()),
        normalized,
        [inv_std] if weight is None else [inv_std, weight],  # per row, per column
        dims,  # the statistics always move with x
    )
    return mode.track(out, tangent, fresh=tx is not None or tw is not None)
