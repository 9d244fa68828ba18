"""Each layer's own gradient rule: its parameters' gradients from its input and an estimate of
the gradient at its output.

For a layer z = f(x; W, b) and g ≈ ∂L/∂z, the chain rule inside that one layer gives ∂L/∂W and
∂L/∂b from x and g alone; nothing before or after the layer is involved, so this is no backward
pass through the network (Ren et al., *Scaling Forward Gradient with Local Losses*, ICLR 2023,
form the weight gradient of activity-perturbed forward gradients this way):

- linear, z = x Wᵀ + b:       ∂L/∂W = Σ_r g_r x_rᵀ,   ∂L/∂b = Σ_r g_r   (r over every row of
  every example);
- convolution, z = W ⋆ x + b: ∂L/∂W = the correlation of x with g (``torch.nn.grad``'s
  ``conv{1,2,3}d_weight``), ∂L/∂b = g summed over examples and positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad.errors import ConfigurationError

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LOCAL_RULE_MODULES = (nn.Linear, *_CONVOLUTIONS)
_WEIGHT_GRADIENT = {
    nn.Conv1d: torch.nn.grad.conv1d_weight,
    nn.Conv2d: torch.nn.grad.conv2d_weight,
    nn.Conv3d: torch.nn.grad.conv3d_weight,
}


def has_local_rule(module: nn.Module) -> bool:
    """Is there a local rule for this module's parameters (a Linear or Conv1d/2d/3d)?"""
    return isinstance(module, LOCAL_RULE_MODULES) and not isinstance(
        module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    )


def parameter_gradients(
    module: nn.Module, x: torch.Tensor, g: torch.Tensor
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, ∂L/∂parameter)`` for the module's weight and bias (see module docstring).

    Args:
        module: a Linear or Conv layer.
        x: its input, ``(B, ..., in)`` or ``(B, C_in, *spatial)``.
        g: the estimate of ∂L/∂z at its output, shaped like the output.
    """
    if isinstance(module, nn.Linear):
        rows_g = g.reshape(-1, g.shape[-1])
        weight = rows_g.T @ x.reshape(-1, x.shape[-1]).to(g.dtype)
        bias = rows_g.sum(0)
    else:
        weight = _convolution_weight_gradient(module, x.to(g.dtype), g)
        bias = g.sum(dim=[d for d in range(g.dim()) if d != 1])
    found = [(module.weight, weight)]
    if module.bias is not None:
        found.append((module.bias, bias))
    return found


def _convolution_weight_gradient(module: nn.Module, x: torch.Tensor, g: torch.Tensor):
    spatial = x.dim() - 2
    if g.dim() != spatial + 2:
        raise ConfigurationError(
            f"{type(module).__name__} got an unbatched input of shape {tuple(x.shape)}; "
            "activity perturbation needs a batch dimension first."
        )
    padding = _explicit_padding(module, spatial)
    if any(left != right for left, right in padding) or module.padding_mode != "zeros":
        pad = [amount for pair in reversed(padding) for amount in pair]
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x, padding = F.pad(x, pad, mode=mode), [(0, 0)] * spatial
    rule = next(r for kind, r in _WEIGHT_GRADIENT.items() if isinstance(module, kind))
    return rule(
        x,
        module.weight.shape,
        g,
        stride=module.stride,
        padding=[left for left, _ in padding],
        dilation=module.dilation,
        groups=module.groups,
    )


def _explicit_padding(module: nn.Module, spatial: int) -> list[tuple[int, int]]:
    """``(left, right)`` zero padding per spatial dimension, as the convolution applies it."""
    if module.padding == "valid":
        return [(0, 0)] * spatial
    if module.padding == "same":  # PyTorch pads the extra element on the right
        pairs = []
        for size, dilation in zip(module.kernel_size, module.dilation):
            total = dilation * (size - 1)
            pairs.append((total // 2, total - total // 2))
        return pairs
    return [(p, p) for p in module.padding]


__all__ = ["LOCAL_RULE_MODULES", "has_local_rule", "parameter_gradients"]
