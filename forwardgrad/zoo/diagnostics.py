"""Diagnostics that read forwardgrad's PRIVATE internals, kept apart from the rest of the zoo.

Until estimators say which path a step took (``estimator.last_path``, ``last_fallback``), the
harness asks here: ``fast_path_blocker`` runs the stacked-tangent evaluation of
``forwardgrad.jvp.stacked`` directly and returns the reason it stops, and ``took_general_path``
reads the estimator's private set of models sent to the general path. Both return ``None``
when those internals are gone, so that the zoo keeps working while the engine changes.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

import forwardgrad as fg


def fast_path_blocker(model: nn.Module, closure: Callable[[], torch.Tensor]) -> str | None:
    """Why the stacked-tangent evaluation cannot run ``closure`` (its first failing operation),
    ``""`` when it runs, ``None`` when this diagnostic is unavailable.

    Buffers and the CPU RNG are put back afterwards. PRIVATE ACCESS: ``stacked_derivatives``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        stacked = importlib.import_module("forwardgrad.jvp.stacked")
        evaluate = stacked.stacked_derivatives
        inspect.signature(evaluate).bind(closure, params, params.__getitem__, 1)
    except (ImportError, AttributeError, TypeError, ValueError):  # the engine has changed
        return None
    generator = torch.Generator(params[0].device).manual_seed(0)
    directions = fg.sample_tangents(params, 1, "rademacher", generator)

    saved = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            evaluate(closure, params, directions.__getitem__, 1)
    except Exception as error:  # any failure sends the estimator to the general path
        return one_line(error)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        torch.set_rng_state(rng)
    return ""


def took_general_path(estimator: object, model: nn.Module) -> bool | None:
    """Whether ``estimator`` has sent ``model`` to the general path for good (``None`` when it
    keeps no such record). PRIVATE ACCESS: ``ForwardGradient._general``."""
    general = getattr(estimator, "_general", None)
    if general is None:
        return None
    return model in general


def one_line(error: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
