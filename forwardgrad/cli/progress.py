"""Progress of training runs on stderr: a tqdm bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import math
import sys
import time

from forwardgrad.experiments.callbacks import Progress


class ProgressDisplay:
    """Shows ``Progress`` events: a tqdm bar (loss, steps/s, ETA) on a terminal, else a plain
    line about every tenth of a run. One bar or series of lines per run (a run starts with the
    event whose ``train_loss`` is None)."""

    def __init__(self, stream=None, mode: str = "auto"):
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.bar = None
        self.started = 0.0
        self.first_step = 0
        self.next_line = 0

    def __call__(self, event: Progress) -> None:
        if self.mode == "none":
            return
        if event.train_loss is None:
            self._start(event)
            return
        if self.mode == "bar":
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix_str(self._postfix(event), refresh=False)
            if event.step >= event.total_steps:
                self.close()
        elif event.step >= self.next_line or event.step >= event.total_steps:
            rate = (event.step - self.first_step) / max(time.monotonic() - self.started, 1e-9)
            eta = (event.total_steps - event.step) / rate if rate > 0 else math.inf
            print(
                f"{event.label}: step {event.step}/{event.total_steps}, {self._postfix(event)}, "
                f"{rate:.3g} steps/s, ETA {_duration(eta)}",
                file=self.stream,
                flush=True,
            )
            self.next_line = event.step + max(1, event.total_steps // 10)

    def _start(self, event: Progress) -> None:
        self.close()
        self.started, self.first_step = time.monotonic(), event.step
        self.next_line = event.step + max(1, event.total_steps // 10)
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=event.total_steps,
                initial=event.step,
                desc=event.label,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )
        else:
            print(f"{event.label}: from step {event.step} to {event.total_steps}", file=self.stream)

    @staticmethod
    def _postfix(event: Progress) -> str:
        text = f"loss {event.train_loss:.4g}"
        if event.test_accuracy is not None:
            text += f", test acc {event.test_accuracy:.3f}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
