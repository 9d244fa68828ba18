"""The zoo's registry: each case builds a real architecture with random weights and a fixed batch.

A case is a recipe, not a model: ``case.instantiate(size, dtype, seed)`` builds the model and its
batch from the seed alone (the global RNG is left as it was), so two calls give the same weights
and the same batch. Sizes: ``"bench"`` puts one forward pass at roughly 10-100 ms on one CPU
thread; ``"small"`` is the same architecture cut down for the test suite.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

SIZES = ("small", "bench")

Batch = tuple  # the model's inputs and targets, as the case's loss reads them


@dataclass(frozen=True)
class ZooCase:
    """One architecture in the zoo.

    Attributes:
      name: unique, lower-case, e.g. ``"gpt2-sdpa"``.
      family: what kind of model it is (``"transformers"``, ``"vision"``, ``"sequence"``, ...).
      build: ``build(size) -> (model, batch)`` in float32; called with the RNG already seeded.
      loss: ``loss(model, batch) -> scalar tensor``, the training loss computed from the model's
        output (cross-entropy on logits); it is what a closure returns.
      requires: importable modules the case needs (optional dependencies).
      description: the architecture in a few words.
      float32_limited: a float64 copy is only float32-exact, because part of the model, or
        PyTorch's own derivative of it, computes in float32 whatever the dtype (Hugging Face's
        RMSNorm and some eager softmaxes cast to float32; hardsigmoid's backward and forward-mode
        formulas scale by a float32 1/6, 0.16666667163, also for float64).
    """

    name: str
    family: str
    build: Callable[[str], tuple[nn.Module, Batch]]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    requires: tuple[str, ...] = ()
    description: str = ""
    float32_limited: bool = False

    def unavailable(self) -> str | None:
        """Why this case cannot be built here (a missing optional dependency), else ``None``."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if not missing:
            return None
        return (
            f"{self.name} needs {', '.join(missing)}, which is not installed; "
            'install the zoo extra: pip install -e ".[zoo]"'
        )

    def instantiate(
        self, size: str = "bench", dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> ZooInstance:
        """The model (in train mode) and its batch, built from ``seed`` alone."""
        if size not in SIZES:
            raise ValueError(f"unknown zoo size {size!r}; choose one of {', '.join(SIZES)}.")
        reason = self.unavailable()
        if reason is not None:
            raise ModuleNotFoundError(reason)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, batch = self.build(size)
        model = model.to(dtype).train()
        return ZooInstance(self, model, tuple(_cast(x, dtype) for x in batch))


@dataclass
class ZooInstance:
    """A built case: ``closure()`` computes the loss of ``model`` on ``batch``."""

    case: ZooCase
    model: nn.Module
    batch: Batch
    closure: Callable[[], torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.closure = lambda: self.case.loss(self.model, self.batch)


def _cast(value, dtype: torch.dtype):
    if isinstance(value, PackedSequence):
        return value.to(dtype) if value.data.is_floating_point() else value
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


CASES: dict[str, ZooCase] = {}


def register(case: ZooCase) -> ZooCase:
    if case.name in CASES:
        raise ValueError(f"zoo case {case.name!r} is registered twice.")
    CASES[case.name] = case
    return case


def get_case(name: str) -> ZooCase:
    try:
        return CASES[name]
    except KeyError:
        raise ValueError(f"unknown zoo case {name!r}; choose one of {', '.join(CASES)}.") from None


def pick(size: str, small, bench):
    """The preset for ``size``: ``small`` for the test suite, ``bench`` for measurements."""
    return small if size == "small" else bench
