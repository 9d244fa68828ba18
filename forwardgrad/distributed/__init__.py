"""Data-parallel training on ``torch.distributed``: ``process_group`` and ``World`` say where a
process sits in the job; ``DataParallel`` runs any estimator with its numbers summed over the
ranks (K + 1 numbers per step for the forward gradient, whatever the model's size)."""

from forwardgrad.distributed.data_parallel import DataParallel, wrap_for_backprop
from forwardgrad.distributed.world import (
    DEFAULT_CHECK_EVERY,
    DEFAULT_TIMEOUT_S,
    TIMEOUT_VARIABLE,
    WIRE_DTYPE,
    Launch,
    RankFailure,
    RanksDisagree,
    World,
    detect_launch,
    end_rank,
    parameter_checksum,
    process_group,
    shard_batch,
    shard_bounds,
    timeout_from_environment,
    weighted,
)
from forwardgrad.errors import DistributedError, NonFiniteLoss

__all__ = [
    "DEFAULT_CHECK_EVERY",
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_VARIABLE",
    "WIRE_DTYPE",
    "DataParallel",
    "DistributedError",
    "Launch",
    "NonFiniteLoss",
    "RankFailure",
    "RanksDisagree",
    "World",
    "detect_launch",
    "end_rank",
    "parameter_checksum",
    "process_group",
    "shard_batch",
    "shard_bounds",
    "timeout_from_environment",
    "weighted",
    "wrap_for_backprop",
]
