"""Local losses: a sequential network cut into blocks, each trained by a loss of its own.

Ren, Kornblith, Liao & Hinton, *Scaling Forward Gradient with Local Losses* (ICLR 2023): block l
maps h_{l-1} to h_l, and a small auxiliary head a_l (here a linear classifier, optionally after
average pooling) turns h_l into predictions with their own loss

    L_l = (1/B) Σ_n ℓ(a_l(f_l(sg(h_{l-1,n}))), y_n)        (sg: stop-gradient, ``detach``),

the last block's loss being the model's own (no head). Because each block's input is detached,
L_l depends only on block l's and head l's parameters θ_l, so ∇_{θ_l} Σ_j L_j = ∇_{θ_l} L_l:
every block learns from a loss that depends on few parameters, and with forward gradients all
blocks' directional derivatives come from one evaluation, since a block's tangent reaches only
its own loss (it is detached from the next block's input).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators.tables import LossGroup
from forwardgrad.jvp.replay import restore_rng_states, rng_states

HEADS = ("linear", "pool")


@dataclass(frozen=True)
class BlockEntry:
    """What a block started from in one evaluation: its input (detached) and the RNG states."""

    input: torch.Tensor
    rng: tuple


class LocalLosses(nn.Module):
    """Wraps an ``nn.Sequential`` classifier into blocks with auxiliary heads and local losses.

    Use it as the model: ``local(x)`` runs the blocks end to end and **predicts with the last
    block's output** (the wrapped model's own output; the heads only train). ``local.losses(x,
    y)`` gives the ``(G, B)`` table of each block's per-example loss, block inputs detached;
    ``local.loss(x, y)`` its objective Σ_l L_l. With the estimators:

    - ``ForwardGradient``: closure ``lambda: local.losses(x, y)``; block l's parameters (and its
      head's) are estimated with block l's own derivative d_l, not Σ_l d_l (the model declares
      ``loss_groups``);
    - ``ActivityPerturbation``: the same closure; each layer's output gradient is estimated
      from its own block's per-example derivatives;
    - ``Backprop``: closure ``lambda: local.loss(x, y)``: local backprop (each block's gradient
      stops at its detached input), the baseline local-learning methods are compared with.

    Args:
        model: an ``nn.Sequential`` whose children run in order.
        input_shape: one example's shape, e.g. ``(1, 28, 28)``, to size the heads.
        num_classes: the heads' outputs.
        blocks: ``None``: a block starts at every child with trainable parameters (children
            before the first one join it). Else a list of blocks, each a list of child names
            (``"0"``, ``"fc1"``) or positions, that together name every child once, in order.
        head: ``"linear"`` (flatten, then linear), ``"pool"`` (average-pool each channel of an
            image-like output to 2x2, flatten, linear) or ``head(index, feature_shape) ->
            nn.Module`` for block ``index``'s head.
        loss: per-example loss ``loss(outputs, targets) -> (B,)``; default cross-entropy.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        blocks: Sequence[Sequence[str | int]] | None = None,
        head: str | Callable[[int, tuple[int, ...]], nn.Module] = "linear",
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Sequential):
            raise ConfigurationError(
                f"LocalLosses needs an nn.Sequential whose children run in order, got "
                f"{type(model).__name__}; write the model as nn.Sequential(...) of its layers."
            )
        if not (callable(head) or head in HEADS):
            raise ConfigurationError(
                f"unknown head {head!r}; choose one of {', '.join(HEADS)} or pass a function."
            )
        self.blocks = nn.ModuleList(
            nn.Sequential(*(model[i] for i in positions)) for positions in partition(model, blocks)
        )
        shapes = _feature_shapes(self.blocks, tuple(input_shape), model)
        self.heads = nn.ModuleList(
            _make_head(head, i, shape, num_classes) for i, shape in enumerate(shapes[:-1])
        )
        reference = next(model.parameters(), None)
        if reference is not None:
            self.heads.to(device=reference.device, dtype=reference.dtype)
        self.criterion = loss or _cross_entropy
        self._detach = True
        self._entries: list[BlockEntry] | None = None  # recorded by ``recording_entries``
        self._start: tuple[int, torch.Tensor] | None = None  # set by ``starting_at``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction: the blocks end to end (no detaching, no heads)."""
        for block in self.blocks:
            x = block(x)
        return x

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The ``(G, B)`` table ℓ_{l,n}: block l's head's loss on example n (the last block's
        loss is on the model's output), each block's input detached."""
        first, h, last = 0, x, len(self.blocks) - 1
        if self._start is not None:
            first, h = self._start
        rows = []
        for i in range(first, last + 1):
            if self._entries is not None:
                self._entries.append(BlockEntry(h.detach(), rng_states()))
            h = self.blocks[i](h.detach() if i > 0 and self._detach else h)
            rows.append(self._per_example(self.heads[i](h) if i < last else h, y, i))
        skipped = [torch.zeros_like(rows[0])] * first  # blocks before the start: no loss
        return torch.stack(skipped + rows)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ_l L_l, the objective of ``losses`` (a scalar, for ``Backprop``)."""
        return self.losses(x, y).mean(1).sum()

    def loss_groups(self) -> list[LossGroup]:
        """Block l's parameters and its head's: what loss l trains (``estimators.tables``)."""
        heads = [*self.heads, None]
        return [
            LossGroup(
                body=tuple(block.parameters()),
                head=() if head is None else tuple(head.parameters()),
            )
            for block, head in zip(self.blocks, heads)
        ]

    @contextlib.contextmanager
    def end_to_end(self) -> Iterator[None]:
        """Within it, ``losses`` does not detach block inputs: its last row is then the model's
        own loss through every block (what local guesses project; ``estimators.guess``)."""
        self._detach = False
        try:
            yield
        finally:
            self._detach = True

    @contextlib.contextmanager
    def recording_entries(self) -> Iterator[list[BlockEntry]]:
        """Within it, ``losses`` records each block's input and the RNG states as the block
        starts, in the list it yields (for ``starting_at``)."""
        self._entries = entries = []
        try:
            yield entries
        finally:
            self._entries = None

    @contextlib.contextmanager
    def starting_at(self, index: int, entry: BlockEntry) -> Iterator[None]:
        """Within it, ``losses`` starts at block ``index`` from its recorded ``entry`` (the
        input, and the RNG states, which are put back now), and the rows of the blocks before
        it are zeros. Local guesses evaluate the loss from block l onward this way, at the cost
        of the blocks after l only."""
        restore_rng_states(entry.rng)
        self._start = (index, entry.input)
        try:
            yield
        finally:
            self._start = None

    def _per_example(self, outputs: torch.Tensor, y: torch.Tensor, index: int) -> torch.Tensor:
        values = self.criterion(outputs, y)
        if values.shape != (outputs.shape[0],):
            raise ConfigurationError(
                f"the loss of block {index} has shape {tuple(values.shape)}; LocalLosses needs "
                "one loss per example (e.g. reduction='none')."
            )
        return values


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def partition(model: nn.Sequential, blocks) -> list[list[int]]:
    """The children's positions, block by block, checked to partition the model in order."""
    names = [name for name, _ in model.named_children()]
    if blocks is None:
        starts = [i for i, child in enumerate(model) if _trains(child)]
        if not starts:
            raise ConfigurationError("the model has no child with trainable parameters.")
        bounds = [0, *starts[1:], len(names)]
        return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
        raise ConfigurationError(f"blocks must be a list of lists of child names, got {blocks!r}.")
    positions = []
    for block in blocks:
        if isinstance(block, (str, int)) or not isinstance(block, Sequence) or not block:
            raise ConfigurationError(
                f"each block must be a non-empty list of child names or positions, got {block!r}."
            )
        positions.append([_position(entry, names) for entry in block])
    if [i for block in positions for i in block] != list(range(len(names))):
        raise ConfigurationError(
            f"blocks {_show(blocks)} do not partition the model: they must name each of its "
            f"children ({', '.join(names)}) exactly once, in order."
        )
    return positions


def _position(entry, names: list[str]) -> int:
    if isinstance(entry, bool) or not isinstance(entry, (str, int)):
        raise ConfigurationError(f"a block lists {entry!r}; use child names or positions.")
    if isinstance(entry, int):
        if not 0 <= entry < len(names):
            raise ConfigurationError(
                f"blocks name position {entry}, but the model has {len(names)} children."
            )
        return entry
    if entry not in names:
        raise ConfigurationError(
            f"blocks name {entry!r}, which is not a child of the model ({', '.join(names)})."
        )
    return names.index(entry)


def _show(blocks) -> str:
    return "[" + ", ".join("[" + ", ".join(map(str, b)) + "]" for b in blocks) + "]"


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _feature_shapes(blocks: nn.ModuleList, input_shape, model) -> list[tuple[int, ...]]:
    """Each block's output shape for one example, from a forward in eval mode (no buffer or
    running statistic changes) on zeros."""
    reference = next(model.parameters(), None)
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    device = reference.device if reference is not None else None
    modes = [(m, m.training) for m in blocks.modules()]
    blocks.eval()
    shapes, h = [], torch.zeros((2, *input_shape), dtype=dtype, device=device)
    try:
        with torch.no_grad():
            for block in blocks:
                h = block(h)
                shapes.append(tuple(h.shape[1:]))
    finally:
        for m, training in modes:
            m.training = training
    return shapes


def _make_head(head, index: int, shape: tuple[int, ...], classes: int) -> nn.Module:
    if callable(head):
        return head(index, shape)
    if head == "pool" and len(shape) in (2, 3):
        pool = nn.AdaptiveAvgPool1d(2) if len(shape) == 2 else nn.AdaptiveAvgPool2d(2)
        pooled = shape[0] * 2 ** (len(shape) - 1)  # channels x the 2 or 2x2 grid
        return nn.Sequential(pool, nn.Flatten(), nn.Linear(pooled, classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), classes))


__all__ = ["HEADS", "LocalLosses", "partition"]
