"""``forwardgrad bench --tangent-rank``: structured-tangent contenders beside the dense ones."""

import torch
from helpers import bench_config

from forwardgrad import bench
from forwardgrad.cli import main


def test_tangent_rank_adds_structured_contenders_for_every_k_and_distribution():
    config = bench_config(
        "--tangents", "1,16", "--distributions", "normal", "--tangent-rank", "1,4"
    )
    assert config.ranks == (1, 4)
    keys = [c.key for c in config.timing_contenders()]
    for rank in (1, 4):
        for k in (1, 16):
            assert f"forward-gradient:normal:{k}:rank{rank}" in keys
        assert f"forward-sgd:normal:rank{rank}" in keys
    assert "forward-gradient:normal:1" in keys and "forward-sgd:normal" in keys  # dense kept
    memory = {c.key for c in config.memory_contenders()}
    assert {"forward-sgd:normal:rank1", "forward-sgd:normal:rank4"} <= memory
    assert not any(c.rank for c in bench_config("--tangents", "1").timing_contenders())


def test_rank_contenders_step_with_structured_tangents():
    for contender in [bench.forward_gradient(1, "rademacher", rank=1), bench.forward_sgd(rank=2)]:
        assert contender.rank in (1, 2) and "rank" in contender.label
        model, images, labels = bench.make_problem("deep-mlp", 4, depth=2, width=8)
        before = [p.detach().clone() for p in model.parameters()]
        bench.make_step(contender, model, images, labels, lr=0.1)()
        weight = model[1].weight  # 8 x 784: its update is a rank-1 (or rank-2) matrix
        change = weight.detach() - before[0]
        assert 0 < torch.linalg.matrix_rank(change) <= contender.rank


def test_cli_bench_prints_the_rank_ratio_and_refuses_bad_ranks(tmp_path, capsys):
    argv = ["bench", "--quick", "--models", "logreg", "--rounds", "1", "--tangents", "1"]
    argv += ["--distributions", "normal", "--tangent-rank", "1", "--skip", "memory,sampling"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FG K=1 normal rank 1" in out and "ForwardSGD normal rank 1" in out
    for bad in ("0", "x", "1.5"):
        assert main(["bench", "--tangent-rank", bad, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--tangent-rank" in err and "Traceback" not in err
