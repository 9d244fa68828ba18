"""Data-parallel training: real gloo process groups on 127.0.0.1, started inside the test.

Each group runs every scenario it can in one go, because starting processes that import torch
costs seconds on a small machine. Workers write what they saw to files; the test compares.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import write_tiny_dataset
from torch import nn

from forwardgrad.cli import main
from forwardgrad.distributed import (
    DataParallel,
    DistributedError,
    Launch,
    NonFiniteLoss,
    RankFailure,
    RanksDisagree,
    World,
    detect_launch,
    parameter_checksum,
    process_group,
    shard_batch,
    shard_bounds,
    timeout_from_environment,
    weighted,
)
from forwardgrad.estimators import Backprop, ForwardGradient, ZerothOrder
from forwardgrad.experiments import datasets as data
from forwardgrad.experiments.checkpoints import list_checkpoints, read_checkpoint
from forwardgrad.experiments.problems import make_model

WORLD_SIZE = 2
EXAMPLES, BATCH, STEPS = 15, 7, 5  # batches of 7, 7, 1: the last leaves rank 1 an empty shard


# --------------------------------------------------------------------------- pieces without a group


@pytest.mark.parametrize("size", [0, 1, 6, 7, 64])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_the_batch_in_order(size, world_size):
    bounds = [shard_bounds(size, r, world_size) for r in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    lengths = [stop - start for start, stop in bounds]
    assert max(lengths) - min(lengths) <= 1


def test_shard_weights_sum_to_one_and_empty_shards_weigh_nothing():
    images, labels = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    shards = [shard_batch((images, labels), r, 3) for r in range(3)]
    assert [len(s[1]) for s, _ in shards] == [2, 2, 1]
    assert sum(w for _, w in shards) == pytest.approx(1.0)
    assert torch.equal(torch.cat([s[0] for s, _ in shards]), images)
    (tiny_images, tiny_labels), weight = shard_batch((images[:1], labels[:1]), 1, 2)
    assert weight == 0.0 and len(tiny_labels) == 1  # still runs one example, weighted 0
    assert shard_batch(None, 0, 2) == (None, 1.0) and shard_batch(None, 1, 2) == (None, 0.0)
    with pytest.raises(ValueError, match="different lengths"):
        shard_batch((images, labels[:3]), 0, 2)
    with pytest.raises(TypeError, match="tuple/list of tensors"):
        shard_batch("abc", 0, 2)


def test_weighted_closure_scales_the_loss():
    assert weighted(lambda: torch.tensor(3.0), 0.25)() == 0.75
    closure = lambda: torch.tensor(3.0)  # noqa: E731
    assert weighted(closure, 1.0) is closure


def test_launch_is_read_from_torchrun_variables():
    assert detect_launch({}) is None
    environ = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "2"}  # fmt: skip
    assert detect_launch(environ) == Launch(1, 4, 1, "127.0.0.1", 29500, 2)
    with pytest.raises(DistributedError, match="MASTER_PORT is not set; launch with torchrun"):
        detect_launch({k: v for k, v in environ.items() if k != "MASTER_PORT"})
    with pytest.raises(DistributedError, match="WORLD_SIZE='x' should be an integer"):
        detect_launch({**environ, "WORLD_SIZE": "x"})
    with pytest.raises(DistributedError, match="RANK=4 must be below WORLD_SIZE=4"):
        detect_launch({**environ, "RANK": "4"})
    assert timeout_from_environment({}) == 300.0
    assert timeout_from_environment({"FORWARDGRAD_TIMEOUT_S": "7.5"}) == 7.5
    with pytest.raises(DistributedError, match="positive number of seconds"):
        timeout_from_environment({"FORWARDGRAD_TIMEOUT_S": "-1"})


def test_process_group_needs_a_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="start the job with torchrun"):
        with process_group():
            pass


def test_checksum_sees_one_flipped_bit():
    model = tiny_model(torch.float32)
    before = parameter_checksum(model)
    assert parameter_checksum(model) == before
    with torch.no_grad():
        weight = model[0].weight.view(-1)
        weight[3] = torch.nextafter(weight[3], torch.tensor(math.inf))
    assert parameter_checksum(model) != before


def test_data_parallel_checks_its_arguments():
    world = World(0, 1)
    with pytest.raises(TypeError, match="ForwardGradient, ZerothOrder or Backprop"):
        DataParallel(object(), world)
    with pytest.raises(TypeError, match="must be a World"):
        DataParallel(Backprop(), "world")
    with pytest.raises(ValueError, match="call prepare"):
        DataParallel(Backprop(), world).estimate(tiny_model(torch.float32), lambda: None)


# --------------------------------------------------------------------------- the tiny problem


def tiny_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def tiny_data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(EXAMPLES, 6, generator=generator, dtype=dtype)
    return inputs, torch.randint(0, 3, (EXAMPLES,), generator=generator)


def global_batches(dtype: torch.dtype):
    inputs, labels = tiny_data(dtype)
    for step in range(STEPS):
        start = (step * BATCH) % EXAMPLES
        yield inputs[start : start + BATCH], labels[start : start + BATCH]


ESTIMATORS = {
    "forward": lambda: ForwardGradient(tangents=3, seed=5),
    "forward-projection": lambda: ForwardGradient(tangents=2, combine="projection", seed=5),
    "forward-structured": lambda: ForwardGradient(tangents=3, seed=5, rank=1),
    "zeroth-order": lambda: ZerothOrder(tangents=2, eps=1e-3, seed=5),
    "backprop": lambda: Backprop(),
}


def train_tiny(name: str, dtype: torch.dtype, world: World | None) -> dict:
    """STEPS of momentum SGD on the tiny problem: one process (world None) or one rank."""
    model = tiny_model(dtype)
    estimator = ESTIMATORS[name]()
    forward_model = model
    if world is not None:
        estimator = DataParallel(estimator, world)
        forward_model = estimator.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, step_bytes = [], []
    for step, batch in enumerate(global_batches(dtype)):
        weight = 1.0
        if world is not None:
            batch, weight = world.shard(batch)
            world.check_parameters(model, step)

        def closure(batch=batch):
            return F.cross_entropy(forward_model(batch[0]), batch[1])

        losses.append(float(estimator.estimate(model, weighted(closure, weight))))
        step_bytes.append(getattr(estimator, "bytes_last_step", 0))
        optimizer.step()
    expected = estimator.bytes_per_step(model) if world is not None else 0
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state": state, "losses": losses, "bytes": step_bytes, "expected_bytes": expected}


# --------------------------------------------------------------------------- running ranks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TIMEOUT_S = 3.0  # the process groups' timeout: how long a hung rank is waited for


def worker(rank: int, ports: list[int], out: str) -> None:
    """Run every scenario in turn, each in a process group of its own; save after each."""
    torch.set_num_threads(1)
    for (name, scenario), port in zip(SCENARIOS.items(), ports):
        launch = Launch(rank, WORLD_SIZE, rank, "127.0.0.1", port)
        results: dict = {}
        try:
            with process_group(launch, "gloo", TIMEOUT_S) as world:
                scenario(world, results)
        except Exception as error:  # recorded for the test to inspect
            results["error"] = (type(error).__name__, str(error), traceback.format_exc())
        results["finished_at"] = time.time()
        torch.save(results, Path(out) / f"{name}-rank{rank}.pt")


def scenario_train(world: World, results: dict) -> None:
    for dtype in (torch.float64, torch.float32):
        for name in ESTIMATORS:
            results[name, dtype] = train_tiny(name, dtype, world)
    # A rank that drifts by one ulp is caught at the next check, by every rank.
    model = tiny_model(torch.float32)
    if world.rank == 1:
        with torch.no_grad():
            model[2].bias[0] = torch.nextafter(model[2].bias[0], torch.tensor(math.inf))
    try:
        world.check_parameters(model, step=300)
    except RanksDisagree as error:
        results["disagree"] = (str(error), error.step, error.ranks)
    # A NaN on one rank stops every rank, none of them stepping.
    model = tiny_model(torch.float32)
    estimator = DataParallel(ForwardGradient(seed=1), world)
    nan = math.nan if world.rank == 1 else 1.0
    try:
        estimator.estimate(model, lambda: (model(torch.ones(1, 6)) * nan).sum())
    except NonFiniteLoss as error:
        results["nan"] = str(error)


def fail_in_step_two(world: World, results: dict, failure: Callable[[], None]) -> None:
    """Rank 1 runs ``failure`` instead of step 2; rank 0 must stop with a RankFailure."""
    model = tiny_model(torch.float32)
    estimator = DataParallel(ForwardGradient(seed=5), world)
    for step, batch in enumerate(global_batches(torch.float32)):
        if world.rank == 1 and step == 2:
            failure()
            return
        batch, weight = world.shard(batch)
        results["failing_since"] = time.time()
        closure = weighted(lambda b=batch: F.cross_entropy(model(b[0]), b[1]), weight)
        estimator.estimate(model, closure)


def scenario_hung_rank(world: World, results: dict) -> None:
    fail_in_step_two(world, results, lambda: time.sleep(TIMEOUT_S + 3))


def scenario_killed_rank(world: World, results: dict) -> None:
    fail_in_step_two(world, results, lambda: os.kill(os.getpid(), signal.SIGKILL))


# Run in this order: the killed rank ends its process.
SCENARIOS = {"train": scenario_train, "hung": scenario_hung_rank, "killed": scenario_killed_rank}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every scenario's results on each rank (None where the rank wrote none): one start of
    WORLD_SIZE processes, since starting processes that import torch is the slow part."""
    out = tmp_path_factory.mktemp("ranks")
    ports = [free_port() for _ in SCENARIOS]
    context = mp.start_processes(
        worker, args=(ports, str(out)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    try:
        for process in context.processes:
            process.join(100)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    found = []
    for rank in range(WORLD_SIZE):
        results = {}
        for name in SCENARIOS:
            path = out / f"{name}-rank{rank}.pt"
            results[name] = torch.load(path, weights_only=False) if path.exists() else None
        found.append(results)
    return found


@pytest.fixture(scope="module")
def trained(ranks) -> list[dict]:
    """Both ranks' results of ``scenario_train``."""
    for rank, results in enumerate(ranks):
        assert results["train"] is not None, f"rank {rank} wrote nothing"
        assert "error" not in results["train"], results["train"]["error"][2]
    return [results["train"] for results in ranks]


# --------------------------------------------------------------------------- tests on two ranks


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_two_ranks_reach_the_parameters_of_one_process(trained, name, dtype):
    single = train_tiny(name, dtype, world=None)
    # float64 shows the algebra is exact; float32 differs by rounding of the shard sums, which
    # zeroth-order amplifies by 1/eps in its finite differences.
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    if name == "zeroth-order" and dtype == torch.float32:
        tolerance = 2e-3
    for results in trained:
        ranked = results[name, dtype]
        assert ranked["losses"] == pytest.approx(single["losses"], rel=tolerance, abs=tolerance)
        for key, value in single["state"].items():
            torch.testing.assert_close(ranked["state"][key], value, rtol=tolerance, atol=tolerance)
    # ...and the training moved them: a no-op would pass the comparison too.
    start = tiny_model(dtype).state_dict()
    assert any(not torch.equal(start[k], single["state"][k]) for k in start)


@pytest.mark.timeout(120)
def test_ranks_hold_identical_parameters(trained):
    for key in trained[0]:
        if isinstance(key, tuple):
            for name, value in trained[0][key]["state"].items():
                assert torch.equal(value, trained[1][key]["state"][name]), (key, name)


@pytest.mark.timeout(120)
def test_bytes_communicated_per_step(trained):
    parameters = sum(p.numel() for p in tiny_model(torch.float32).parameters())
    for dtype in (torch.float64, torch.float32):
        width = torch.finfo(dtype).bits // 8
        expected = {
            "forward": 8 * (3 + 1),  # K + 1 float64 numbers
            "forward-projection": 8 * (2 + 1),
            "forward-structured": 8 * (3 + 1),
            "zeroth-order": 8 * 2 * 2,  # 2K loss values
            "backprop": width * parameters + 8,  # every gradient, and the loss
        }
        for results in trained:
            for name, count in expected.items():
                assert results[name, dtype]["bytes"] == [count] * STEPS, (name, dtype)
                assert results[name, dtype]["expected_bytes"] == count


@pytest.mark.timeout(120)
def test_a_rank_that_drifts_is_named_with_the_step(trained):
    for results in trained:
        message, step, ranks = results["disagree"]
        assert step == 300 and ranks == [1]
        assert "at step 300 the parameters of rank(s) 1 differ from rank 0's" in message


@pytest.mark.timeout(120)
def test_a_nan_on_one_rank_stops_every_rank(trained):
    for results in trained:
        assert results["nan"].startswith("the loss summed over the ranks is nan")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_rank_stops_the_others_within_the_timeout(ranks, how):
    survivor, failed = ranks[0][how], ranks[1][how]
    assert survivor is not None, "rank 0 never finished"
    kind, message, _ = survivor["error"]
    assert kind == "RankFailure"
    assert "rank 0 of 2: the all-reduce of the step's 2 numbers failed" in message
    assert "another rank died, or hung for more than the 3 s timeout" in message
    waited = survivor["finished_at"] - survivor["failing_since"]
    assert waited < TIMEOUT_S + 3, f"rank 0 waited {waited:.1f} s"
    if how == "killed":
        assert failed is None and waited < TIMEOUT_S  # a dead peer is noticed without waiting
    assert issubclass(RankFailure, DistributedError)


# --------------------------------------------------------------------------- the command line


REPO = Path(__file__).resolve().parents[2]  # the checkout, whose forwardgrad the ranks import
TRAIN_SIZE, TEST_SIZE = 96, 40
# Run under torchrun with the tiny data set registered; on the first attempt rank 1 kills
# itself (SIGKILL) in training step KILL_RANK1_AT_STEP, if that is set.
LAUNCHER = f"""
import os, runpy, signal, sys
from forwardgrad.experiments import datasets as data, loop

data.DATASETS["tiny"] = data.DatasetSpec(
    name="tiny", mirrors=(), sha256=None, gz_md5=None, train_size={TRAIN_SIZE},
    test_size={TEST_SIZE},
)
kill_at = int(os.environ.get("KILL_RANK1_AT_STEP", "0"))
if kill_at and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    step, calls = loop.train_step, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*args, **kwargs)

    loop.train_step = dying
sys.argv[0] = "forwardgrad"
runpy.run_module("forwardgrad", run_name="__main__")
"""
TRAIN_FLAGS = [
    "train", "--problem", "logreg", "--dataset", "tiny", "--batch-size", "15", "--tangents", "2",
    "--lr", "0.05", "--lr-decay", "0", "--steps", "12", "--checkpoint-every", "4",
    "--eval-every", "6", "--log-every", "1", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    write_tiny_dataset(root / "data" / "tiny", TRAIN_SIZE, TEST_SIZE)
    (root / "launcher.py").write_text(LAUNCHER)
    return root


def torchrun(root: Path, run_dir: Path, *extra: str, env: dict | None = None):
    """``torchrun --standalone --nproc_per_node 2 launcher.py train ... --out run_dir``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(WORLD_SIZE), "--monitor-interval", "0.1", *extra,
               str(root / "launcher.py"), *TRAIN_FLAGS, "--out", str(run_dir)]  # fmt: skip
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "FORWARDGRAD_DATA_DIR": str(root / "data"), "FORWARDGRAD_TIMEOUT_S": "30",
               **(env or {})}  # fmt: skip
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=100)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(list_checkpoints(run_dir / "checkpoints")[0][1])["model"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_root) -> Path:
    run_dir = tiny_root / "uninterrupted"
    finished = torchrun(tiny_root, run_dir)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.count("report:") == 1, finished.stdout  # rank 0 alone speaks
    return run_dir


@pytest.mark.timeout(120)
def test_torchrun_train_equals_one_process(uninterrupted, tiny_root, monkeypatch, capsys):
    monkeypatch.setitem(data.DATASETS, "tiny", data.DatasetSpec(
        name="tiny", mirrors=(), sha256=None, gz_md5=None, train_size=TRAIN_SIZE,
        test_size=TEST_SIZE))  # fmt: skip
    monkeypatch.setenv("FORWARDGRAD_DATA_DIR", str(tiny_root / "data"))
    single = tiny_root / "single"
    assert main([*TRAIN_FLAGS, "--threads", "1", "--out", str(single)]) == 0
    capsys.readouterr()
    # float32 rounding of the shard sums: tiny against how far training moved the parameters.
    torch.manual_seed(0)  # as training does before building the model
    start = {k: v.detach() for k, v in make_model("logreg", 10).state_dict().items()}
    for name, value in final_state(single).items():
        moved = float((value - start[name]).abs().max())
        assert moved > 0.1
        difference = float((final_state(uninterrupted)[name] - value).abs().max())
        assert difference < 1e-5 * moved, (name, difference, moved)
    config = json.loads((uninterrupted / "config.json").read_text())
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert config["world_size"] == summary["world_size"] == 2
    assert config["bytes_communicated_per_step"] == summary["bytes_communicated_per_step"] == 24
    assert json.loads((single / "summary.json").read_text())["bytes_communicated_per_step"] == 0


@pytest.mark.timeout(180)
def test_a_killed_rank_is_restarted_from_the_last_checkpoint(uninterrupted, tiny_root):
    run_dir = tiny_root / "restarted"
    finished = torchrun(tiny_root, run_dir, "--max-restarts", "1", env={"KILL_RANK1_AT_STEP": "7"})
    assert finished.returncode == 0, finished.stderr
    assert "RankFailure" not in finished.stderr  # the survivor's error is one line, no traceback
    assert "another rank died" in finished.stderr
    # Resumed from step 4 and ended exactly where the uninterrupted run did.
    for name, value in final_state(uninterrupted).items():
        assert torch.equal(final_state(run_dir)[name], value), name
    metrics = [(run_dir / "metrics.csv").read_text(), (uninterrupted / "metrics.csv").read_text()]
    losses = [[row.split(",")[2] for row in text.splitlines()] for text in metrics]
    assert losses[0] == losses[1]


@pytest.mark.timeout(180)
def test_without_restarts_the_survivor_exits_3_in_one_line(tiny_root):
    finished = torchrun(tiny_root, tiny_root / "killed", env={"KILL_RANK1_AT_STEP": "7"})
    assert finished.returncode == 1  # torchrun's own code when a rank fails
    ours = [line for line in finished.stderr.splitlines() if line.startswith("forwardgrad:")]
    assert len(ours) == 1 and "rank 0 of 2" in ours[0] and "another rank died" in ours[0]
    # torchrun's report lists each failed rank's exit code: the survivor's is the documented 3,
    # not -15 (torchrun's SIGTERM arriving while it shut down).
    survivor = re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: (-?\d+)", finished.stderr)
    assert survivor is not None and survivor.group(1) == "3", finished.stderr
