"""Plots and ``report.md`` for forwardgrad runs and comparisons, drawn from the logs alone.

A run directory (one estimator on one problem) holds ``config.json``, ``metrics.csv`` and
``summary.json`` (see ``forwardgrad.experiments.schema``). Reporting only reads those files, so
``forwardgrad plot RUN_DIR...`` can redraw everything at any time.

Frank-Wolfe runs are compared within their own experiment ("logreg, Frank-Wolfe in l1:10"), with
plots of the gap against iterations.

As in Baydin et al. (2022), the plots show the loss against iterations and against wall-clock
time (log scale), one curve per estimator, and for 2-D test functions the optimisation
trajectories over a contour plot. The report tabulates, per estimator, the median time per
iteration and its ratio to backprop measured in the same comparison, the final losses, test
accuracy, the time to reach a stated loss threshold and peak memory, and puts the paper's claims
beside ours.

Modules: ``runs`` (reading run directories), ``thresholds`` (smoothing and the loss threshold),
``tables``, ``claims``, ``plots`` (matplotlib, imported only when drawing) and ``report``.
"""

from forwardgrad.reporting.report import plot_runs, write_comparison_report, write_run_report
from forwardgrad.reporting.runs import Run, find_run_dirs, read_run
from forwardgrad.reporting.thresholds import loss_threshold, smoothed_train_loss, time_to_threshold

__all__ = [
    "Run",
    "find_run_dirs",
    "loss_threshold",
    "plot_runs",
    "read_run",
    "smoothed_train_loss",
    "time_to_threshold",
    "write_comparison_report",
    "write_run_report",
]
