"""The benchmark's local-learning contenders: activity perturbation, local losses, local
guesses and local backprop, each a complete step on the problems it applies to."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import bench_config

import forwardgrad as fg
from forwardgrad import bench
from forwardgrad.experiments.methods import with_local_losses

LOCAL = [
    bench.ACTIVITY_LOCAL,
    bench.forward_gradient_local("rademacher"),
    bench.LOCAL_GUESS,
    bench.LOCAL_BACKPROP,
]


def tiny(depth=2):
    return bench.make_problem("deep-mlp", 6, depth=depth, width=8)


@pytest.mark.parametrize("contender", [bench.ACTIVITY, *LOCAL], ids=lambda c: c.key)
def test_every_local_contender_moves_every_layer(contender):
    model, images, labels = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    bench.make_step(contender, model, images, labels, lr=0.1, problem="deep-mlp")()
    for p, q in zip(model.parameters(), before, strict=True):
        assert not torch.equal(p, q)


def test_local_backprop_steps_on_the_sum_of_the_blocks_losses():
    model, images, labels = tiny(depth=3)
    reference = copy.deepcopy(model)
    torch.manual_seed(5)  # the heads' initialisation
    bench.make_step(bench.LOCAL_BACKPROP, model, images, labels, lr=0.1, problem="deep-mlp")()
    torch.manual_seed(5)
    local = with_local_losses("deep-mlp", reference, 10)
    local.loss(images, labels).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach() - 0.1 * q.grad)


def test_activity_steps_on_each_examples_loss_with_its_seed():
    model, images, labels = tiny()
    reference = copy.deepcopy(model)
    bench.make_step(bench.ACTIVITY, model, images, labels, lr=0.1, seed=3, problem="deep-mlp")()
    fg.ActivityPerturbation(seed=3).estimate(
        reference, lambda: F.cross_entropy(reference(images), labels, reduction="none")
    )
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach() - 0.1 * q.grad)


def test_local_contenders_only_where_the_model_has_blocks():
    model, images, labels = bench.make_problem("logreg", 4)
    with pytest.raises(ValueError, match="trains local losses, which need a model of blocks"):
        bench.make_step(bench.LOCAL_GUESS, model, images, labels, problem="logreg")
    rows = bench.time_steps("logreg", 4, [bench.ACTIVITY, *LOCAL], rounds=1, warmup=0)
    assert [row["contender"] for row in rows] == ["backprop", "activity"]
    rows = bench.time_steps("mlp", 4, [bench.LOCAL_GUESS], rounds=1, warmup=0)
    assert [row["contender"] for row in rows] == ["backprop", bench.LOCAL_GUESS.key]


def test_local_contenders_are_measured_unless_skipped():
    config = bench_config("--quick")  # distributions normal, rademacher: local FG is normal
    local = [bench.ACTIVITY, bench.ACTIVITY_LOCAL, bench.forward_gradient_local("normal")]
    assert {*local, bench.LOCAL_GUESS, bench.LOCAL_BACKPROP} <= set(config.timing_contenders())
    assert bench.LOCAL_GUESS in config.memory_contenders()
    skipped = bench_config("--quick", "--skip", "local")
    assert not [c for c in skipped.timing_contenders() if c.local or c.estimator == "activity"]
    assert not [c for c in skipped.memory_contenders() if c.local or c.estimator == "activity"]


def test_memory_of_a_local_contender_in_a_fresh_process():
    rows = bench.memory_table(
        [("logreg", None, 8), ("deep-mlp", 2, 8)], [bench.LOCAL_GUESS], threads=1
    )
    assert [(row["model"], row["contender"]) for row in rows] == [
        ("logreg", "backprop"),
        ("deep-mlp", "backprop"),
        ("deep-mlp", bench.LOCAL_GUESS.key),
    ]
    assert rows[-1]["above_resident_bytes"] >= 0


def test_activity_perturbation_keeps_no_layer_tangents_between_its_evaluation_and_rules():
    """Tangents are drawn again for each layer's rule instead of kept: a step's peak holds the
    layers' inputs and one layer's tangents, near backprop's: 1.15x here, against 2.45x when
    every layer's tangents and output gradients were kept."""
    rows = bench.memory_table([("deep-mlp", 8, 512)], [bench.ACTIVITY], threads=1)
    ratio = {row["contender"]: row["ratio_to_backprop"] for row in rows}["activity"]
    assert ratio < 1.8
