"""Progress of training runs on stderr: a tqdm bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import math
import statistics
import sys
import time

from forwardgrad.experiments.callbacks import Progress


class ProgressDisplay:
    """Shows ``Progress`` events: a tqdm bar (loss, steps/s, ETA) on a terminal, else a plain
    line about every tenth of a run. One bar or series of lines per run (a run starts with the
    event whose ``train_loss`` is None).

    Within a plan of several runs (``start_run``), every line starts with "run i/N, problem" and
    gives the ETA of the whole plan besides the run's; ``note`` prints a line of its own (the lr
    a sweep chose, a run's final figures)."""

    def __init__(self, stream=None, mode: str = "auto"):
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.bar = None
        self.started = 0.0
        self.first_step = 0
        self.next_line = 0
        self.run_index, self.run_total, self.where = 0, 0, ""
        self.run_started = 0.0
        self.finished_s: list[float] = []  # wall time of each finished run of the plan

    def start_run(self, index: int, total: int, problem: str) -> None:
        """Run ``index`` (from 1) of ``total`` begins, on ``problem``."""
        self.close()
        self.run_index, self.run_total, self.where = index, total, f"run {index}/{total}, {problem}"
        self.run_started = time.monotonic()

    def end_run(self) -> None:
        self.finished_s.append(time.monotonic() - self.run_started)

    def note(self, text: str) -> None:
        """A line of its own, e.g. the lr a sweep chose or a run's final figures."""
        if self.mode == "none":
            return
        self.close()
        prefix = f"{self.where}: " if self.where else ""
        print(prefix + text, file=self.stream, flush=True)

    def _overall_eta(self, run_eta: float) -> str:
        """ ", overall ETA 12m30s": this run's ETA plus the mean finished run per run left (this
        run's own projected length before any has finished)."""
        if self.run_total <= 1:
            return ""
        left = self.run_total - self.run_index
        if self.finished_s:
            per_run = statistics.mean(self.finished_s)
        else:
            per_run = time.monotonic() - self.run_started + run_eta
        return f", overall ETA {_duration(run_eta + left * per_run)}"

    def _label(self, event: Progress) -> str:
        return f"{self.where}: {event.label}" if self.where else event.label

    def __call__(self, event: Progress) -> None:
        if self.mode == "none":
            return
        if event.train_loss is None:
            self._start(event)
            return
        if self.mode == "bar":
            self.bar.update(event.step - self.bar.n)
            postfix = self._postfix(event)
            if self.run_total > 1 and self.bar.format_dict.get("rate"):
                rate = self.bar.format_dict["rate"]
                postfix += self._overall_eta((event.total_steps - event.step) / rate)
            self.bar.set_postfix_str(postfix, refresh=False)
            if event.step >= event.total_steps:
                self.close()
        elif event.step >= self.next_line or event.step >= event.total_steps:
            rate = (event.step - self.first_step) / max(time.monotonic() - self.started, 1e-9)
            eta = (event.total_steps - event.step) / rate if rate > 0 else math.inf
            print(
                f"{self._label(event)}: step {event.step}/{event.total_steps}, "
                f"{self._postfix(event)}, {rate:.3g} steps/s, ETA {_duration(eta)}"
                + self._overall_eta(eta),
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
                desc=self._label(event),
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )
        else:
            print(
                f"{self._label(event)}: from step {event.step} to {event.total_steps}",
                file=self.stream,
            )

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
