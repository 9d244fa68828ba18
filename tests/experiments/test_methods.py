"""Run settings beyond the paper's estimators: structured tangents, activity perturbation, local
losses and local guesses, from TrainConfig to the model, the closure and a trained run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import final_params, image_config, install_tiny_dataset, read_metrics

from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators import ActivityPerturbation, ForwardGradient, LocalLosses
from forwardgrad.experiments import TrainConfig, train
from forwardgrad.experiments.config import build_estimator, config_from_dict, load_config
from forwardgrad.experiments.labels import run_label
from forwardgrad.experiments.methods import (
    applies,
    for_estimator,
    logged_loss,
    loss_kind,
    make_closure,
    with_local_losses,
)
from forwardgrad.experiments.problems import DEEP_MLP_DEPTH, make_model


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    return install_tiny_dataset(monkeypatch, tmp_path / "data", 64, 32)


@pytest.mark.parametrize("problem", ["mlp", "cnn", "deep-mlp"])
def test_local_losses_predict_with_the_plain_model_and_share_its_parameters(problem):
    torch.manual_seed(0)
    plain = make_model(problem)
    local = with_local_losses(problem, plain, 10)
    assert isinstance(local, LocalLosses)
    images = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(local(images), plain(images))
    body = {id(p) for block in local.blocks for p in block.parameters()}
    assert body == {id(p) for p in plain.parameters()}
    # hidden layers (+ output); conv stages, fc1, fc2
    blocks = {"mlp": 3, "cnn": 4, "deep-mlp": DEEP_MLP_DEPTH + 1}[problem]
    assert len(local.blocks) == blocks and len(local.heads) == blocks - 1
    labels = torch.tensor([0, 1, 2])
    assert local.losses(images, labels).shape == (blocks, 3)
    linear = [[isinstance(m, torch.nn.Linear) for m in block] for block in local.blocks]
    if problem != "cnn":  # an MLP: one hidden layer per block, the output layer last
        assert all(sum(block) == 1 for block in linear)


@pytest.mark.parametrize(
    ("changes", "kind", "shape"),
    [
        ({}, "mean", ()),
        ({"estimator": "activity"}, "per-example", (4,)),
        ({"local_losses": True}, "table", (3, 4)),
        ({"local_losses": True, "estimator": "activity"}, "table", (3, 4)),
        ({"local_losses": True, "guess": "local"}, "guess-table", (3, 4)),
        ({"local_losses": True, "estimator": "backprop"}, "local-sum", ()),
    ],
)
def test_each_estimator_gets_the_closure_it_takes(changes, kind, shape):
    config = TrainConfig(problem="mlp", **changes).validate()
    assert loss_kind(config) == kind
    model = make_model("mlp")
    if config.local_losses:
        model = with_local_losses("mlp", model, 10)
    closure = make_closure(kind, model, torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
    assert closure().shape == shape


def test_settings_reach_the_estimator_and_the_label():
    forward = build_estimator(TrainConfig(problem="mlp", tangent_rank=2), seed=0)
    assert isinstance(forward, ForwardGradient) and forward.rank == 2
    guess = build_estimator(TrainConfig(problem="mlp", local_losses=True, guess="local"), 0)
    assert guess.guess == "local"
    assert isinstance(build_estimator(TrainConfig(estimator="activity"), 0), ActivityPerturbation)
    assert run_label(TrainConfig(tangent_rank=1)) == "forward (K=1, normal, mean, rank 1)"
    assert run_label(TrainConfig(problem="mlp", local_losses=True)).endswith(", local losses")
    assert run_label(TrainConfig(estimator="activity")) == "activity (K=1, normal)"


# Every nonsense combination: one sentence that names the setting and its flag.
REFUSED = [
    ({"tangent_rank": 0}, "--tangent-rank"),
    ({"tangent_rank": -2}, "--tangent-rank"),
    ({"tangent_rank": 1.5}, "--tangent-rank"),
    ({"tangent_rank": True}, "--tangent-rank"),
    ({"tangent_rank": "1"}, "--tangent-rank"),
    ({"tangent_rank": 1, "estimator": "backprop"}, "--tangent-rank"),
    ({"tangent_rank": 1, "estimator": "zeroth-order"}, "--tangent-rank"),
    ({"tangent_rank": 1, "estimator": "activity"}, "--tangent-rank"),
    ({"tangent_rank": 1, "distribution": "orthogonal"}, "--tangent-rank"),
    ({"tangent_rank": 1, "combine": "projection"}, "--tangent-rank"),
    ({"guess": "local"}, "--local-losses"),
    ({"guess": "global", "local_losses": True}, "--guess"),
    ({"guess": "local", "local_losses": True, "estimator": "backprop"}, "--guess"),
    ({"guess": "local", "local_losses": True, "tangent_rank": 1}, "--tangent-rank"),
    ({"guess": "local", "local_losses": True, "tangents": 4}, "--tangents"),
    ({"local_losses": "yes"}, "--local-losses"),
    ({"local_losses": True, "estimator": "zeroth-order"}, "--local-losses"),
    ({"local_losses": True, "problem": "logreg"}, "--local-losses"),
    ({"local_losses": True, "problem": "beale"}, "--local-losses"),
    ({"local_losses": True, "problem": "rosenbrock"}, "--local-losses"),
    ({"estimator": "activity", "problem": "beale"}, "activity"),
    ({"estimator": "activity", "problem": "rosenbrock"}, "activity"),
]


@pytest.mark.parametrize(("changes", "flag"), REFUSED)
def test_nonsense_combinations_are_one_clear_sentence(changes, flag):
    values = {"problem": "mlp", **changes}
    with pytest.raises(ConfigurationError) as error:
        TrainConfig(**values).validate()
    message = str(error.value)
    assert flag in message and "\n" not in message and message.endswith(".")


def test_a_config_json_without_the_new_settings_loads_with_their_defaults(tmp_path):
    old = {"problem": "mlp", "estimator": "forward", "lr": 1e-3, "steps": 5}
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = load_config(tmp_path)
    assert (config.tangent_rank, config.local_losses, config.guess) == (None, False, None)
    assert config == config_from_dict(old).validate()


def test_shared_settings_apply_to_the_runs_they_mean_something_for():
    base = TrainConfig(problem="mlp", tangent_rank=1, local_losses=True)
    forward, backprop = for_estimator(base, "forward"), for_estimator(base, "backprop")
    zeroth = for_estimator(base, "zeroth-order")
    assert (forward.tangent_rank, forward.local_losses) == (1, True)
    assert (backprop.tangent_rank, backprop.local_losses) == (None, True)
    assert (zeroth.tangent_rank, zeroth.local_losses) == (None, False)
    for config in (forward, backprop, zeroth):
        config.validate()
    beale = for_estimator(TrainConfig(problem="beale", local_losses=True), "forward")
    assert not beale.local_losses and applies(beale)
    assert not applies(for_estimator(TrainConfig(problem="beale"), "activity"))
    assert not applies(for_estimator(TrainConfig(problem="logreg"), "forward", {"guess": "local"}))


@pytest.mark.parametrize(
    "changes",
    [
        {"estimator": "activity"},
        {"estimator": "activity", "local_losses": True},
        {"local_losses": True},
        {"local_losses": True, "guess": "local"},
        {"local_losses": True, "estimator": "backprop"},
        {"tangent_rank": 1},
        {"problem": "deep-mlp", "local_losses": True, "guess": "local"},
    ],
    ids=[
        "activity", "activity-local", "forward-local", "guess", "local-backprop", "rank-1",
        "deep-mlp-guess",
    ],
)  # fmt: skip
def test_a_tiny_mlp_trains_with_each_setting_and_resumes_exactly(tiny, tmp_path, changes):
    changes = {"problem": "mlp", **changes}
    config = image_config(tiny, steps=6, checkpoint_every=3, lr=1e-4, **changes)
    straight = train(config, tmp_path / "straight")
    summary = straight.summary
    assert summary["label"] == run_label(config) and not summary["diverged"]
    assert summary["tangent_rank"] == config.tangent_rank
    assert summary["local_losses"] == config.local_losses and summary["guess"] == config.guess
    stored = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert {k: stored[k] for k in ("estimator", "tangent_rank", "local_losses", "guess")} == {
        "estimator": config.estimator,
        "tangent_rank": config.tangent_rank,
        "local_losses": config.local_losses,
        "guess": config.guess,
    }
    rows = read_metrics(tmp_path / "straight")
    assert all(float(row["train_loss"]) > 0 for row in rows)
    assert float(rows[-1]["test_accuracy"]) >= 0
    assert train(replace(config, steps=3), tmp_path / "resumed").summary["steps"] == 3
    resumed = train(config, tmp_path / "resumed", resume=True)
    assert resumed.resumed_from is not None and resumed.resumed_from.state["step"] == 3
    straight_params, resumed_params = (
        final_params(tmp_path / "straight"),
        final_params(tmp_path / "resumed"),
    )
    assert straight_params.keys() == resumed_params.keys()
    for name, value in straight_params.items():
        assert torch.equal(value, resumed_params[name]), name
    losses = [
        [r["train_loss"] for r in read_metrics(tmp_path / d)] for d in ("straight", "resumed")
    ]
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    "changes",
    [
        {"estimator": "activity"},
        {"local_losses": True},
        {"local_losses": True, "guess": "local"},
        {"local_losses": True, "estimator": "backprop"},
    ],
)
def test_the_final_row_logs_the_loss_the_estimator_returns(changes):
    config = TrainConfig(problem="mlp", **changes).validate()
    torch.manual_seed(0)
    model = with_local_losses("mlp", make_model("mlp"), 10) if config.local_losses else None
    model = model or make_model("mlp")
    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8)
    kind = loss_kind(config)
    with torch.no_grad():
        logged = logged_loss(kind, make_closure(kind, model, images, labels)())
    returned = build_estimator(config, seed=0).estimate(
        model, make_closure(kind, model, images, labels)
    )
    assert logged == pytest.approx(float(returned), rel=1e-5)
