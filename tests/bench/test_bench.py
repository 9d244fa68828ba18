"""The benchmark library: alternation, the rows it returns, memory probes, tables, CLI."""

import json

import pytest
import torch
from helpers import bench_config

from forwardgrad import bench
from forwardgrad.cli import main
from forwardgrad.experiments.problems import DEEP_MLP_DEPTH


def test_alternate_rotates_the_order_and_discards_warmup():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench.alternate(steps, rounds=3, warmup=1)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert rounds == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_alternate_stops_at_the_budget_after_the_minimum_rounds():
    times = bench.alternate({"a": lambda: None}, rounds=100, warmup=0, budget_s=0.0, min_rounds=3)
    assert len(times["a"]) == 3


def test_time_steps_rows():
    contenders = [bench.FORWARD, bench.forward_gradient(2, "rademacher"), bench.ZEROTH_ORDER]
    rows = bench.time_steps("logreg", 8, contenders, rounds=2, warmup=1)
    by_key = {row["contender"]: row for row in rows}
    assert set(by_key) == {"backprop", *(c.key for c in contenders)}
    assert by_key["backprop"]["ratio_to_backprop"] == 1.0
    for row in rows:
        assert row["median_ms"] > 0 and row["steps"] == 2 and row["batch"] == 8


def test_every_contender_steps_and_changes_the_model():
    for contender in [bench.BACKPROP, bench.forward_gradient(1), bench.forward_sgd("rademacher")]:
        model, images, labels = bench.make_problem("deep-mlp", 4, depth=2, width=8)
        before = [p.detach().clone() for p in model.parameters()]
        bench.make_step(contender, model, images, labels, lr=0.1)()
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_kept_contenders_step_on_the_buffers_of_the_last_step():
    for contender in [bench.BACKPROP_KEPT, bench.kept(bench.forward_gradient(1))]:
        assert contender.grads == "kept"
        model, images, labels = bench.make_problem("deep-mlp", 4, depth=2, width=8)
        step = bench.make_step(contender, model, images, labels, lr=0.1)
        step()
        buffers = [p.grad for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        step()
        assert all(p.grad is g for p, g in zip(model.parameters(), buffers))
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_memory_table_compares_each_regime_with_its_own_backprop():
    estimate = bench.forward_gradient(1)
    rows = bench.memory_table([("logreg", None, 16)], [estimate, bench.kept(estimate)], threads=1)
    by_key = {row["contender"]: row for row in rows}
    assert set(by_key) == {"backprop", "backprop:kept", estimate.key, estimate.key + ":kept"}
    for key, reference in [(estimate.key, "backprop"), (estimate.key + ":kept", "backprop:kept")]:
        above = by_key[reference]["above_resident_bytes"]
        if above:
            expected = by_key[key]["above_resident_bytes"] / above
            assert by_key[key]["ratio_to_backprop"] == pytest.approx(expected)
    assert by_key["backprop:kept"]["grads"] == "kept" and by_key["backprop"]["grads"] == "fresh"


def test_deep_mlp_depth():
    model = bench.deep_mlp(3, width=16)
    assert sum(isinstance(m, torch.nn.Linear) for m in model) == 4  # 3 hidden layers + output
    model, images, _ = bench.make_problem("deep-mlp", 2)  # the problem's own depth
    assert sum(isinstance(m, torch.nn.Linear) for m in model) == DEEP_MLP_DEPTH + 1
    assert images.shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="integer depth"):
        bench.deep_mlp(0)


def test_sampling_throughput_rows():
    rows = bench.sampling_throughput(size=10_000, rounds=2, warmup=0)
    methods = {row["method"] for row in rows}
    assert {"forwardgrad normal", "torch normal_", "forwardgrad rademacher"} <= methods
    assert all(row["values_per_s"] > 0 for row in rows)


def test_memory_probe_in_a_fresh_process():
    result = bench.peak_memory("logreg", 16, bench.BACKPROP, threads=1)
    assert result["peak_bytes"] >= result["resident_bytes"] > 0
    assert result["above_bytes"] >= 0


def fake_results():
    timing = [
        {
            "model": "mlp",
            "batch": 64,
            "contender": c.key,
            "label": c.label,
            "steps": 20,
            "median_ms": ms,
            "ratio_to_backprop": ms / 5.0,
        }
        for c, ms in [(bench.BACKPROP, 5.0), (bench.forward_gradient(1), 4.0)]
    ]
    memory = [
        {
            "model": "deep-mlp",
            "depth": 4,
            "batch": 1024,
            "contender": c.key,
            "label": c.label,
            "param_bytes": 2**24,
            "above_resident_bytes": b,
            "ratio_to_backprop": b / 2**25,
            "method": "VmHWM after clear_refs",
        }
        for c, b in [(bench.BACKPROP, 2**25), (bench.forward_sgd(), 2**23)]
    ]
    sampling = [
        {"method": "torch normal_", "values": 10, "median_ms": 1.0, "values_per_s": 1e8},
        {"method": "forwardgrad rademacher", "values": 10, "median_ms": 0.1, "values_per_s": 1e9},
    ]
    return {
        "started": "2024-01-01T00:00:00+00:00",
        "machine": bench.machine(),
        "load_average_after": [1.0, 1.0, 1.0],
        "timing": timing,
        "sampling": sampling,
        "memory": memory,
    }


def test_markdown_and_files(tmp_path):
    results = fake_results()
    text = bench.to_markdown(results)
    assert "| mlp | 64 | 5.0 ms (n=20) | 0.80x |" in text
    assert "| forwardgrad rademacher | 1.000 | 10.00x |" in text
    assert "| deep-mlp depth 4 | 1024 | 16 MiB | 32 MiB (1.00x) | 8 MiB (0.25x) |" in text
    json_path, md_path = bench.write_results(results, tmp_path / "out")
    assert json.loads(json_path.read_text())["timing"][1]["ratio_to_backprop"] == 0.8
    assert md_path.read_text() == text
    assert "kept from the last step" not in text  # no such rows
    results["memory"].append(
        {**results["memory"][0], "contender": "backprop:kept", "grads": "kept"}
    )
    assert "kept from the last step" in bench.to_markdown(results)


def test_config_from_flags():
    quick = bench_config("--quick")
    assert quick.rounds == 5 and quick.models == ("logreg", "mlp")
    config = bench_config(
        "--models", "cnn", "--tangents", "1,16", "--skip", "memory", "--threads", "1"
    )
    assert config.models == ("cnn",) and config.tangents == (1, 16)
    assert config.skip == ("memory",) and config.threads == 1
    with pytest.raises(ValueError, match="unknown models resnet"):
        bench_config("--models", "resnet")
    with pytest.raises(ValueError, match="unknown skip"):
        bench_config("--skip", "everything")


def test_cli_bench(tmp_path, capsys):
    argv = ["bench", "--quick", "--models", "logreg", "--rounds", "1", "--tangents", "1"]
    argv += ["--skip", "memory", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| logreg | 64 |" in out and "Tangent sampling" in out
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.md").exists()
    assert main(["bench", "--models", "resnet", "--out", str(tmp_path)]) == 2


def test_cli_bench_zoo(tmp_path, capsys):
    argv = ["bench", "--zoo", "--models", "embedding-bag", "--rounds", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    table = (tmp_path / "zoo.md").read_text()
    assert "| embedding-bag |" in table and "with rank-1 tangents" in table
    assert "| embedding-bag |" in capsys.readouterr().out
    assert main(["bench", "--zoo", "--models", "resnet", "--out", str(tmp_path)]) == 2
    assert "unknown zoo case 'resnet'" in capsys.readouterr().err
