"""Estimator specs: the runs ``compare --estimators`` and ``reproduce --estimators`` put side by
side, each an estimator name with its own settings.

Grammar (items separated by commas):

    SPECS  := SPEC ("," SPEC)*
    SPEC   := NAME [":" OPTION ("," OPTION)*]
    OPTION := KEY "=" VALUE

An item of the form ``KEY=VALUE`` (no colon) continues the options of the spec before it, so
``forward,forward:rank=1,forward:local=on,guess=local,activity,backprop`` is five specs: dense
forward, forward with rank-1 tangents, forward with local losses and local guesses, activity
perturbation, backprop. The keys:

- ``rank=R``: structured tangents of rank R (``--tangent-rank``);
- ``local=on|off``: local losses (``--local-losses``);
- ``guess=local``: local guesses (``--guess local``);
- ``tangents=K``: K tangents per step (``--tangents``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forwardgrad.experiments.methods import GUESSES, RUN_ESTIMATORS

SPEC_SYNTAX = "NAME[:KEY=VALUE,...] with keys rank=R, local=on|off, guess=local, tangents=K"
_SWITCH = {"on": True, "off": False}


def _positive_integer(key: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{key} takes a positive integer, got {text!r}")
        return int(text)

    return parse


def _switch(text: str) -> bool:
    if text not in _SWITCH:
        raise ValueError(f"local takes on or off, got {text!r}")
    return _SWITCH[text]


def _guess(text: str) -> str:
    if text not in GUESSES:
        raise ValueError(f"guess takes {' or '.join(GUESSES)}, got {text!r}")
    return text


# Each key of a spec: the TrainConfig field it sets and how its value is read.
SPEC_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "rank": ("tangent_rank", _positive_integer("rank")),
    "local": ("local_losses", _switch),
    "guess": ("guess", _guess),
    "tangents": ("tangents", _positive_integer("tangents")),
}


@dataclass(frozen=True)
class EstimatorSpec:
    """One spec: the estimator's name and the TrainConfig fields its options set."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        keys = {fieldname: key for key, (fieldname, _) in SPEC_KEYS.items()}
        options = [f"{keys[k]}={_show(v)}" for k, v in self.settings.items()]
        return self.name + (":" + ",".join(options) if options else "")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def parse_specs(text: str) -> list[EstimatorSpec]:
    """The specs of ``text`` (see the module docstring), duplicates dropped.

    Raises:
        argparse.ArgumentTypeError: a spec that does not follow the grammar, in one sentence.
    """
    specs: list[tuple[str, dict[str, Any]]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, colon, option = item.partition(":")
        if not colon and "=" in item:  # an option of the spec before
            if not specs:
                raise argparse.ArgumentTypeError(
                    f"{item!r} is an option, but no estimator comes before it; write e.g. "
                    f"forward:{item}"
                )
            _add_option(specs[-1], item)
            continue
        name = name.strip()
        if name not in RUN_ESTIMATORS:
            raise argparse.ArgumentTypeError(
                f"unknown estimator {name!r} in {text!r}; choose from {', '.join(RUN_ESTIMATORS)}"
            )
        specs.append((name, {}))
        if colon:
            _add_option(specs[-1], option.strip())
    if not specs:
        raise argparse.ArgumentTypeError(f"give at least one estimator spec, {SPEC_SYNTAX}")
    unique: list[EstimatorSpec] = []
    for spec in (EstimatorSpec(name, settings) for name, settings in specs):
        if spec not in unique:  # equal settings in any order are the same spec
            unique.append(spec)
    return unique


def _add_option(spec: tuple[str, dict[str, Any]], option: str) -> None:
    name, settings = spec
    key, equals, value = (part.strip() for part in option.partition("="))
    if not equals or key not in SPEC_KEYS:
        raise argparse.ArgumentTypeError(
            f"{option!r} in the spec of {name} is not KEY=VALUE with a key of "
            f"{', '.join(SPEC_KEYS)}; specs read {SPEC_SYNTAX}"
        )
    fieldname, read = SPEC_KEYS[key]
    if fieldname in settings:
        raise argparse.ArgumentTypeError(f"the spec of {name} sets {key} twice; keep one")
    try:
        settings[fieldname] = read(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} in the spec of {name}") from None
