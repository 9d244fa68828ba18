"""Activity perturbation and local losses data-parallel: two real gloo ranks on 127.0.0.1.

Each rank perturbs its own examples with tangents of its own stream, and the ranks sum the loss
and every gradient (activity perturbation) or each block's loss and derivatives (forward
gradients with local losses). One start of two processes runs every check.
"""

from __future__ import annotations

import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import forwardgrad as fg
from forwardgrad.distributed import DataParallel, Launch, end_rank, process_group, weighted

WORLD_SIZE = 2


class Summing:
    """What DataParallel's reducer does, run by hand on this rank's own estimate."""

    def sum(self, values, what):
        total = values.detach().double().clone()
        dist.all_reduce(total)
        return total

    def collective(self, what):  # pragma: no cover - Backprop only
        raise NotImplementedError


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (8,), generator=generator)


def activity_step(world, results):
    model, x, y = problem()
    estimator = DataParallel(fg.ActivityPerturbation(seed=5), world)
    estimator.prepare(model)
    (xs, ys), weight = world.shard((x, y))
    closure = weighted(lambda: F.cross_entropy(model(xs), ys, reduction="none"), weight)
    results["loss"] = float(estimator.estimate(model, closure))
    results["grads"] = [p.grad.clone() for p in model.parameters()]
    results["bytes"] = (estimator.bytes_last_step, estimator.bytes_per_step(model))
    # The same step by hand: this rank's own estimate (its own tangent stream), summed.
    by_hand = fg.ActivityPerturbation(seed=5)
    by_hand.reducer = Summing()
    by_hand.estimate(model, closure)
    results["by_hand"] = [p.grad.clone() for p in model.parameters()]
    _, calls = by_hand.output_gradients(model, closure)
    results["tangents"] = calls[0].u.clone()
    results["full_loss"] = float(F.cross_entropy(model(x), y))


def local_step(world, results):
    model, x, y = problem()
    local = fg.LocalLosses(model, input_shape=(4,), num_classes=3)
    estimator = DataParallel(fg.ForwardGradient(tangents=2, seed=5), world)
    estimator.prepare(local)
    (xs, ys), weight = world.shard((x, y))
    estimator.estimate(local, weighted(lambda: local.losses(xs, ys), weight))
    results["local_grads"] = [p.grad.clone() for p in local.parameters()]
    results["local_bytes"] = (estimator.bytes_last_step, estimator.bytes_per_step(local))


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    results: dict = {}
    try:
        with process_group(Launch(rank, WORLD_SIZE, rank, "127.0.0.1", port), "gloo", 10.0) as w:
            activity_step(w, results)
            local_step(w, results)
    except Exception as error:  # recorded for the test to show
        results["error"] = traceback.format_exc() or str(error)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    end_rank(0)  # results written: no teardown abort can fail the start


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("activity-ranks")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(worker, args=(port, str(out)), nprocs=WORLD_SIZE, start_method="spawn")
    found = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    for results in found:
        assert "error" not in results, results["error"]
    return found


@pytest.mark.timeout(180)
def test_ranks_sum_their_own_estimates_into_the_same_gradient(ranks):
    for results in ranks:
        for a, b in zip(results["grads"], results["by_hand"]):
            torch.testing.assert_close(a, b)
        for a, b in zip(results["grads"], ranks[0]["grads"]):
            assert torch.equal(a, b)
        assert results["loss"] == pytest.approx(results["full_loss"], rel=1e-12)
    n = sum(p.numel() for p in problem()[0].parameters())
    assert ranks[0]["bytes"] == (8 * (n + 1), 8 * (n + 1))  # the loss and every gradient


@pytest.mark.timeout(180)
def test_each_rank_draws_its_own_tangents(ranks):
    first, second = (results["tangents"] for results in ranks)
    assert first.shape == second.shape == (1, 4, 6)
    assert not torch.allclose(first, second)


@pytest.mark.timeout(180)
def test_local_losses_sum_each_blocks_loss_and_derivatives(ranks):
    for a, b in zip(ranks[0]["local_grads"], ranks[1]["local_grads"]):
        assert torch.equal(a, b)
    assert ranks[0]["local_bytes"] == (8 * 2 * (2 + 1), 8 * 2 * (2 + 1))  # 2 blocks, K = 2
