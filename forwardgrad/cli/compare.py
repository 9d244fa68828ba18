"""``forwardgrad compare`` (several estimators on one problem) and ``forwardgrad reproduce``
(every experiment of the paper): runs planned side by side, then one report."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from forwardgrad import reporting
from forwardgrad.cli.flags import (
    DEFAULT_THREADS,
    add_cosine_flag,
    add_data_flags,
    add_estimators_flag,
    add_machine_flags,
    add_method_flags,
    add_run_flags,
    config_from_args,
    names,
)
from forwardgrad.cli.runs import (
    Context,
    Planned,
    UsageError,
    continue_hint,
    default_out,
    run_all,
    time_steps,
    write_reports,
)
from forwardgrad.experiments import paper
from forwardgrad.experiments.config import TrainConfig
from forwardgrad.experiments.labels import run_directory_name
from forwardgrad.experiments.methods import applies, check_method, for_estimator


def add_compare(parser: argparse.ArgumentParser) -> None:
    add_run_flags(parser, single_estimator=False)
    parser.add_argument(
        "--out",
        type=Path,
        help="comparison directory, one run directory per estimator (default "
        "runs/compare-<time>); rerun with the same --out to continue an interrupted comparison",
    )


def run_compare(args: argparse.Namespace, context: Context) -> int:
    base = config_from_args(args)
    out = args.out or default_out(f"compare-{base.problem}")
    context.resume_hint = continue_hint(context.argv, out)
    averaging = (True, False) if args.averaging == "both" else (base.fw_averaging,)
    plan = []
    for spec in args.estimators:
        for fw_averaging in averaging:
            config = replace(
                for_estimator(base, spec.name, spec.settings), fw_averaging=fw_averaging
            )
            if args.lr_sweep:
                run_dir = out / (run_directory_name(config) + "-own-lr")
                plan.append(Planned(config, run_dir, args.lr_sweep, args.sweep_steps))
            else:
                plan.append(Planned(config, out / run_directory_name(config)))
    _check_plan(plan, base)
    run_dirs = run_all(plan, context)
    time_steps(run_dirs, context)
    report = write_reports(out, run_dirs, f"forwardgrad compare: {base.problem}")
    print(f"report: {report}")
    return 0


def _check_plan(plan: list[Planned], base: TrainConfig) -> None:
    """Refuse a comparison with two identical runs, or a shared flag that no run takes."""
    seen = set()
    for planned in plan:
        if planned.run_dir in seen:
            raise UsageError(
                f"two of --estimators make the same run, {planned.run_dir.name}; drop one."
            )
        seen.add(planned.run_dir)
    for field, flag in (("tangent_rank", "--tangent-rank"), ("local_losses", "--local-losses")):
        if getattr(base, field) and not any(getattr(p.config, field) for p in plan):
            raise UsageError(
                f"{flag} applies to none of --estimators; add an estimator that takes it "
                "(forward, or for local losses also activity or backprop) or drop it."
            )


def add_reproduce(parser: argparse.ArgumentParser) -> None:
    problems = [experiment.name for experiment in paper.EXPERIMENTS]
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default runs/reproduce-<time>); rerun with the same --out to "
        "continue an interrupted reproduction",
    )
    parser.add_argument("--full", action="store_true", help="the paper's budget (hours)")
    parser.add_argument(
        "--problems",
        type=names(problems),
        default=problems,
        help=f"comma-separated subset (default {','.join(problems)})",
    )
    add_estimators_flag(
        parser,
        "comma-separated; runs that cannot be made on a problem (activity or local losses on "
        "a test function, local losses on logreg) are left out of it",
    )
    add_method_flags(parser, single_estimator=False)
    parser.add_argument(
        "--no-sweep",
        action="store_true",
        help="skip the 'each estimator at its own tuned lr' comparison",
    )
    add_cosine_flag(parser, "default: each problem's own, 0 for the test functions")
    add_data_flags(parser)
    add_machine_flags(parser)


def _reproduce_plan(args: argparse.Namespace, out: Path) -> list[Planned]:
    """Every run of the chosen experiments: at the paper's lr, then at each one's own lr."""
    plan, method = [], shared_method(args)
    for experiment in paper.EXPERIMENTS:
        if experiment.name not in args.problems:
            continue
        values, sweep_steps = experiment.settings(args.full)
        values["threads"] = DEFAULT_THREADS
        for flag in ("dataset", "data_dir", "seed", "threads", "cosine_every"):
            if getattr(args, flag) is not None:
                values[flag] = getattr(args, flag)
        base = replace(TrainConfig(**values).validate(), **method)
        for config in _experiment_runs(experiment, base, args.estimators):
            run_dir = out / experiment.name / run_directory_name(config)
            plan.append(Planned(config, run_dir))
            if experiment.sweep_candidates and not args.no_sweep:
                own = run_dir.with_name(run_dir.name + "-own-lr")
                plan.append(Planned(config, own, experiment.sweep_candidates, sweep_steps))
        for config in _companion_runs(experiment, base, args.estimators):
            run_dir = out / experiment.name / run_directory_name(config)
            if all(planned.run_dir != run_dir for planned in plan):  # not asked for already
                plan.append(Planned(config, run_dir))
    return plan


def shared_method(args: argparse.Namespace) -> dict:
    """--tangent-rank, --local-losses and --guess as TrainConfig fields, checked together."""
    method = {
        "tangent_rank": args.tangent_rank,
        "local_losses": bool(args.local_losses),
        "guess": args.guess,
    }
    check_method(TrainConfig(problem="mlp", **method))
    return method


def _experiment_runs(experiment, base: TrainConfig, specs) -> list[TrainConfig]:
    """The runs of one experiment: its own list of runs if it has one (of the estimators
    named), else one per spec that can run on its problem (``methods.applies``)."""
    if experiment.runs:
        names = [spec.name for spec in specs]
        return [
            replace(for_estimator(base, run["estimator"]), **run)
            for run in experiment.run_settings(names)
        ]
    runs = [for_estimator(base, spec.name, spec.settings) for spec in specs]
    return [config for config in runs if applies(config)]


def _companion_runs(experiment, base: TrainConfig, specs) -> list[TrainConfig]:
    """The experiment's companion runs (at the paper's lr) of the estimators named."""
    names = [spec.name for spec in specs]
    runs = [
        for_estimator(base, run["estimator"], {k: v for k, v in run.items() if k != "estimator"})
        for run in experiment.companion_settings(names)
    ]
    return [config for config in runs if applies(config)]


def run_reproduce(args: argparse.Namespace, context: Context) -> int:
    out = args.out or default_out("reproduce")
    context.resume_hint = continue_hint(context.argv, out)
    run_dirs = run_all(_reproduce_plan(args, out), context)
    time_steps(run_dirs, context)
    for problem in args.problems:
        mine = [d for d in run_dirs if d.parent.name == problem]
        if mine:
            write_reports(out / problem, mine, f"forwardgrad reproduce: {problem}")
    budget = "the paper's budget" if args.full else "quick budget"
    report = reporting.write_comparison_report(
        out, run_dirs, title=f"forwardgrad reproduce ({budget})"
    )
    print(f"report: {report}")
    return 0
