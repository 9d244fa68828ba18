"""Progress within a plan of runs: where it is (run i of N, problem), the whole plan's ETA, the
lr a sweep chose and each run's closing line with its final evaluated figures."""

from __future__ import annotations

import io

from forwardgrad.cli.progress import ProgressDisplay
from forwardgrad.cli.runs import closing_line
from forwardgrad.experiments import Progress


def _events(label: str, steps: int = 20):
    yield Progress(0, steps, 0, None, 0.1, 0.0, label=label)
    for step in range(1, steps + 1):
        yield Progress(step, steps, 0, 1.0 / step, 0.1, 0.01 * step, label=label)


def test_lines_name_the_run_of_the_plan_its_problem_and_the_overall_eta():
    stream = io.StringIO()
    display = ProgressDisplay(stream, mode="lines")
    for index in (1, 2):
        display.start_run(index, 3, "mlp")
        for event in _events("backprop"):
            display(event)
        display.note("backprop: done after 20 steps, test accuracy 0.500")
        display.end_run()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "run 1/3, mlp: backprop: from step 0 to 20"
    steps = [line for line in lines if "step 20/20" in line]
    assert [line.split(":")[0] for line in steps] == ["run 1/3, mlp", "run 2/3, mlp"]
    assert all("overall ETA" in line for line in steps)
    assert lines[-1] == "run 2/3, mlp: backprop: done after 20 steps, test accuracy 0.500"
    assert len(display.finished_s) == 2


def test_a_single_run_keeps_its_plain_lines_and_quiet_prints_nothing():
    stream = io.StringIO()
    display = ProgressDisplay(stream, mode="lines")
    for event in _events("forward"):
        display(event)
    assert stream.getvalue().startswith("forward: from step 0 to 20")
    assert "overall ETA" not in stream.getvalue()
    quiet = io.StringIO()
    display = ProgressDisplay(quiet, mode="none")
    display.start_run(1, 2, "mlp")
    display.note("anything")
    assert quiet.getvalue() == ""


def test_closing_line_gives_the_final_evaluated_figures():
    summary = {
        "label": "forward (K=1, normal, mean)",
        "steps": 300,
        "final_train_loss": 1.2771,
        "final_test_loss": 1.25,
        "final_test_accuracy": 0.665,
        "final_distance_to_optimum": None,
    }
    assert closing_line(summary) == (
        "forward (K=1, normal, mean): done after 300 steps, train loss 1.277, test loss 1.25, "
        "test accuracy 0.665"
    )
