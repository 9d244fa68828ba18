"""What a run is called: one label for reports, progress and run-directory names."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from forwardgrad.experiments.config import TrainConfig, build_estimator, config_from_dict


def run_label(config: TrainConfig | Mapping[str, Any]) -> str:
    """What a run is called in reports, e.g. "forward (K=1, normal, mean)": the estimator's own
    description (structured tangents add ", rank r" inside it); runs with local losses add
    ", local losses"; Frank-Wolfe runs add ", Frank-Wolfe averaged" or ", Frank-Wolfe raw"
    (the estimate fed to the oracle). ``config`` may be the values of a ``config.json``."""
    if not isinstance(config, TrainConfig):
        config = config_from_dict(config)
    label = build_estimator(config, seed=0).describe()
    if config.local_losses:
        label += ", local losses"
    if config.is_frank_wolfe:
        label += ", Frank-Wolfe " + ("averaged" if config.fw_averaging else "raw")
    return label


def slug(text: str) -> str:
    """``text`` as a file or directory name: lower case, runs of other characters as one "-"."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "run"


def run_directory_name(config: TrainConfig) -> str:
    """The directory a comparison gives this run, e.g. "forward-k-1-normal-mean"."""
    return slug(run_label(config))
