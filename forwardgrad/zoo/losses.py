"""The zoo's training losses: cross-entropy on logits, computed inside the closure."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def classification_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """Cross-entropy of ``model(inputs)`` against class labels; ``batch = (inputs, labels)``."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Language-model loss: position t predicts token t + 1 (logits ``(B, T, V)``)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def language_model_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """Next-token loss of a model that maps tokens ``(B, T)`` to logits ``(B, T, V)``."""
    (tokens,) = batch
    return next_token_loss(model(tokens), tokens)
