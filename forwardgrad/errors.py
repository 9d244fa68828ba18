"""The errors forwardgrad raises on purpose, one family with one base.

Every error here means "the input or the situation is wrong, and this is what to do": its
message is one sentence meant for a person. The command line prints such an error as one line
and exits with code 2 (1 for a run that failed midway, such as a diverged loss); any other
exception is a bug in forwardgrad and keeps its traceback. Code never reads an error's text:
it catches the type.
"""

from __future__ import annotations


class ForwardGradError(Exception):
    """Base of every error forwardgrad raises on purpose (see the module docstring)."""


class ConfigurationError(ForwardGradError, ValueError):
    """An argument or setting has a value that cannot be used; the message names it."""


class EstimatorError(ForwardGradError, ValueError):
    """A gradient cannot be estimated for this model and closure: the message says why."""


class UnsupportedOperation(EstimatorError):
    """The closure uses an operation without a forward-mode derivative; the message names the
    operation and the module it ran in, and what to do instead."""


class NonFiniteLoss(EstimatorError, FloatingPointError):
    """The loss or a directional derivative is NaN or infinite; nothing was updated.

    The same type on one process and in a data-parallel job (where the value is the sum over
    the ranks, so every rank raises it at the same step).

    Attributes:
        value: the offending number (a float).
        what: what it was, e.g. ``"the loss"`` or ``"a directional derivative"``.
    """

    def __init__(self, value: float, what: str = "the loss", detail: str | None = None):
        self.value, self.what = float(value), what
        self.detail = detail or (
            "the model was left unchanged; lower the learning rate, clip the updates or check "
            "the inputs for NaN or inf."
        )
        super().__init__(value)

    def __str__(self) -> str:
        return f"{self.what} is {self.value}; {self.detail}"


class DataError(ForwardGradError, ValueError):
    """A data set is missing, corrupt or cannot be fetched; the message says what to do."""


class CheckpointError(ForwardGradError, ValueError):
    """A checkpoint cannot be read or written; the message names the file."""


class DistributedError(ForwardGradError, RuntimeError):
    """A distributed job cannot go on: a bad launch, or a rank that died, hung or diverged."""
