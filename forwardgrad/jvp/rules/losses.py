"""Rules for the usual losses and the (log-)softmax they are built on.

For log-probabilities ℓ = log_softmax(z), ℓ̇ = ż − Σ_c ż_c softmax(z)_c; a class loss then picks
or weighs the entries of ℓ̇ the way it picks those of ℓ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forwardgrad.jvp.rules.registry import Decline, arg, lift, randn, rule


def _softmax_samples(dtype):
    yield (randn(3, 5, dtype=dtype), 1), {}
    yield (randn(2, 3, 4, dtype=dtype),), {"dim": -1}


@rule("log_softmax", samples=_softmax_samples)
def log_softmax(mode, func, x, *args, **kwargs):
    """ℓ = log_softmax(z):  ℓ̇ = ż − Σ_c ż_c softmax(z)_c along the class dimension."""
    out = func(x, *args, **kwargs)
    dim = arg(args, kwargs, 0, "dim")
    if dim is None:
        raise Decline("log_softmax without dim")
    tx, d = mode.tangent(x), dim % x.dim() + 1
    return mode.track(out, tx - (tx * out.exp()).sum(d, keepdim=True))


@rule("softmax", samples=_softmax_samples)
def softmax(mode, func, x, *args, **kwargs):
    """p = softmax(z):  ṗ = p (ż − Σ_c ż_c p_c) along the class dimension."""
    out = func(x, *args, **kwargs)
    dim = arg(args, kwargs, 0, "dim")
    if dim is None:
        raise Decline("softmax without dim")
    tx, d = mode.tangent(x), dim % x.dim() + 1
    return mode.track(out, out * (tx - (tx * out).sum(d, keepdim=True)))


_LOSS_NAMES = ("target", "weight", "size_average", "ignore_index", "reduce", "reduction")


def _loss_options(args, kwargs, names=_LOSS_NAMES) -> dict:
    options = dict(zip(names, args))
    options.update(kwargs)
    if options.get("size_average") is not None or options.get("reduce") is not None:
        raise Decline("the deprecated size_average/reduce")
    return options


def _reduce_loss(per_item: torch.Tensor, reduction: str, divisor) -> torch.Tensor:
    flat = per_item.reshape(per_item.shape[0], -1)
    if reduction == "none":
        return per_item
    total = flat.sum(1)
    return total / divisor if reduction == "mean" else total


def _class_log_likelihood_tangent(mode, tlogp, target, options):
    """ẏ of nll_loss for log-probabilities whose tangent is ``tlogp`` (K, N, C, ...)."""
    if mode.carries(target) or options.get("weight") is not None:
        raise Decline("weighted or parameter-dependent targets")
    ignore = options.get("ignore_index", -100)
    reduction = options.get("reduction", "mean")
    if target.is_floating_point():  # class probabilities
        per_item = -(tlogp * target).sum(2 if tlogp.dim() > 2 else 1)
        divisor = per_item[0].numel()
    else:
        valid = target != ignore
        index = torch.where(valid, target, 0).unsqueeze(1 if target.dim() > 0 else 0)
        index = index.expand(mode.count, *index.shape)
        class_dim = 2 if tlogp.dim() > 2 or target.dim() > 0 else 1
        per_item = -tlogp.gather(class_dim, index).squeeze(class_dim) * valid
        divisor = valid.sum()
    return _reduce_loss(per_item, reduction, divisor)


def _nll_samples(dtype):
    target = torch.tensor([0, 2, 1, 2])
    yield (torch.log_softmax(randn(4, 3, dtype=dtype), 1), target), {}
    yield (torch.log_softmax(randn(4, 3, dtype=dtype), 1), target), {"reduction": "sum"}
    yield (torch.log_softmax(randn(4, 3, dtype=dtype), 1), target), {"ignore_index": 1}
    yield (torch.log_softmax(randn(4, 3, 2, dtype=dtype), 1), torch.tensor([[0, 1]] * 4)), {}


@rule("nll_loss", samples=_nll_samples, owners=(F,), constant=(1, "target"))
def nll_loss(mode, func, logp, *args, **kwargs):
    """L = −mean ℓ[target]:  L̇ = −mean ℓ̇[target] (ignored targets dropped)."""
    options = _loss_options(args, kwargs)
    out = func(logp, *args, **kwargs)
    tangent = _class_log_likelihood_tangent(mode, mode.tangent(logp), options["target"], options)
    return mode.track(out, tangent)


def _cross_entropy_samples(dtype):
    target = torch.tensor([0, 2, 1, 2])
    yield (randn(4, 3, dtype=dtype), target), {}
    yield (randn(4, 3, dtype=dtype), target), {"reduction": "none"}
    yield (randn(4, 3, dtype=dtype), torch.softmax(randn(4, 3, dtype=dtype), 1)), {}
    yield (randn(3, dtype=dtype), torch.tensor(1)), {}


@rule("cross_entropy", samples=_cross_entropy_samples, owners=(F,), constant=(1, "target"))
def cross_entropy(mode, func, logits, *args, **kwargs):
    """L = nll(log_softmax(z)):  L̇ = the nll of ℓ̇ = ż − Σ_c ż_c softmax(z)_c."""
    options = _loss_options(args, kwargs, (*_LOSS_NAMES, "label_smoothing"))
    if options.get("label_smoothing", 0.0):
        raise Decline("cross-entropy with label smoothing")
    class_dim = 1 if logits.dim() > 1 else 0
    logp = torch.log_softmax(logits, class_dim)  # once, for the value and the tangent
    target = options["target"]
    if target.is_floating_point():  # class probabilities
        out = func(logits, *args, **kwargs)
    else:  # what cross_entropy computes itself: nll_loss of the log-probabilities
        names = ("weight", "ignore_index", "reduction")
        out = F.nll_loss(logp, target, **{k: options[k] for k in names if k in options})
    tx = mode.tangent(logits)
    tlogp = tx - (tx * logp.exp()).sum(class_dim + 1, keepdim=True)
    tangent = _class_log_likelihood_tangent(mode, tlogp, options["target"], options)
    return mode.track(out, tangent)


def _mse_samples(dtype):
    yield (randn(4, 3, dtype=dtype), randn(4, 3, dtype=dtype)), {}
    yield (randn(4, 3, dtype=dtype), randn(4, 3, dtype=dtype)), {"reduction": "sum"}
    yield (randn(4, 3, dtype=dtype), randn(3, dtype=dtype)), {"reduction": "none"}


@rule("mse_loss", samples=_mse_samples, owners=(F,))
def mse_loss(mode, func, x, target, *args, **kwargs):
    """L = mean (x − t)²:  L̇ = mean 2 (x − t)(ẋ − ṫ)."""
    options = _loss_options(args, kwargs, ("size_average", "reduce", "reduction", "weight"))
    if options.get("weight") is not None:
        raise Decline("weighted mse_loss")
    out = func(x, target, *args, **kwargs)
    difference = x - target
    tangent = None
    for t, sign in ((mode.tangent(x), 2.0), (mode.tangent(target), -2.0)):
        if t is not None:
            term = lift(t, difference.dim()) * (sign * difference)
            tangent = term if tangent is None else tangent + term
    reduction = options.get("reduction", "mean")
    if reduction != "none":
        tangent = tangent.reshape(mode.count, -1)
        tangent = tangent.mean(1) if reduction == "mean" else tangent.sum(1)
    return mode.track(out, tangent)
