"""Peak resident memory, as the kernel counts it: the training loop's ``PeakMemory`` and the
benchmark's one-step probes both read it here."""

from __future__ import annotations

import sys


def status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes (Linux only)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS; False where that is not possible
    (not Linux, or a kernel older than 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        status_bytes("VmHWM")
        return True
    except OSError:
        return False


def max_resident_bytes() -> int:
    """The process's lifetime peak RSS from getrusage (0 where it does not exist)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak resident memory of training steps, above the resident memory when training began.

    On Linux the kernel's high-water mark (VmHWM in /proc/self/status) is read, and reset by
    writing 5 to /proc/self/clear_refs, around every evaluation so that evaluation batches do
    not count. Elsewhere: growth of getrusage's ru_maxrss, which includes evaluation and
    cannot see a peak below an earlier one of the same process.
    """

    def __init__(self):
        self.linux = reset_high_water_mark()
        self.method = (
            "peak RSS growth during training steps (Linux VmHWM, reset around evaluation)"
            if self.linux
            else "growth of the process's maximum RSS (getrusage ru_maxrss)"
        )
        self.baseline = status_bytes("VmRSS") if self.linux else max_resident_bytes()
        self.peak = 0

    def pause(self) -> None:
        """Record the peak so far, before work that should not count."""
        current = status_bytes("VmHWM") if self.linux else max_resident_bytes()
        self.peak = max(self.peak, current - self.baseline)

    def resume(self) -> None:
        """Forget the peak of the work since ``pause``."""
        if self.linux:
            reset_high_water_mark()
