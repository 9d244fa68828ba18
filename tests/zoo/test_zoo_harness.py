"""The zoo's measuring harness: it catches a wrong estimate, reports the path, times steps, and
prints the state table."""

import math

import pytest
import torch

import forwardgrad as fg
from forwardgrad.zoo import ZooCase, diagnostics, get_case, harness
from forwardgrad.zoo import __main__ as zoo_main
from forwardgrad.zoo.losses import classification_loss
from forwardgrad.zoo.table import format_table, measure


def test_exactness_is_tight_on_a_fast_path_model():
    result = harness.check_exactness(get_case("checkpointed-mlp"), "small", torch.float64)
    assert result.error is None
    assert result.relative_error < 1e-12
    assert result.derivative == pytest.approx(result.exact, rel=1e-12)
    assert result.path.path in ("fast", "general")


def test_exactness_catches_an_estimate_off_by_one_percent(monkeypatch):
    estimate = fg.ForwardGradient.estimate

    def slightly_wrong(self, model, closure):
        loss = estimate(self, model, closure)
        for p in model.parameters():
            p.grad.mul_(1.01)
        return loss

    monkeypatch.setattr(fg.ForwardGradient, "estimate", slightly_wrong)
    result = harness.check_exactness(get_case("resnet18"), "small", torch.float64, train=False)
    expected = 0.01 * abs(result.exact) / result.gradient_norm  # |d − d_exact| / ‖∇L‖
    assert result.relative_error == pytest.approx(expected, rel=1e-6)
    assert result.relative_error > 1e-4


def test_exactness_catches_a_parameter_left_out_of_the_estimate(monkeypatch):
    estimate = fg.ForwardGradient.estimate

    def without_the_head(self, model, closure):
        loss = estimate(self, model, closure)
        model.fc.bias.grad.zero_()  # as a rule that drops one parameter's tangent would
        return loss

    monkeypatch.setattr(fg.ForwardGradient, "estimate", without_the_head)
    result = harness.check_exactness(get_case("resnet18"), "small", torch.float64)
    assert result.relative_error > 1e-3


class _Doubled(torch.autograd.Function):
    """A custom Function without a jvp: forward-mode AD cannot differentiate through it."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class _DoublingNet(torch.nn.Linear):
    def forward(self, x):
        return _Doubled.apply(super().forward(x))


def test_a_failing_step_is_reported_not_raised():
    def build(size):
        inputs, labels = torch.randn(4, 3), torch.randint(0, 2, (4,))
        return _DoublingNet(3, 2), (inputs, labels)

    case = ZooCase("doubling", "torch.nn", build, classification_loss)
    result = harness.check_exactness(case, "small", torch.float64)
    assert math.isnan(result.relative_error)
    assert "jvp" in result.error


class _ReportingEstimator:
    last_path = "general"
    last_fallback = "no rule for lstm"


def test_path_comes_from_the_estimator_when_it_reports_it():
    instance = get_case("gru-lm").instantiate("small")
    info = harness.path_info(_ReportingEstimator(), instance)
    assert info == harness.PathInfo("general", "no rule for lstm")


def test_blocker_diagnostic_puts_buffers_and_rng_back():
    instance = get_case("resnet18").instantiate("small")
    buffers = [b.clone() for b in instance.model.buffers()]
    rng = torch.get_rng_state()
    blocker = diagnostics.fast_path_blocker(instance.model, instance.closure)
    assert blocker is None or isinstance(blocker, str)
    assert torch.equal(torch.get_rng_state(), rng)
    for before, after in zip(buffers, instance.model.buffers()):
        assert torch.equal(before, after)
    assert all(p.grad is None for p in instance.model.parameters())


def test_one_line_keeps_the_type_and_cuts_long_messages():
    assert diagnostics.one_line(ValueError("a\n  b")) == "ValueError: a b"
    assert len(diagnostics.one_line(RuntimeError("x" * 500), limit=50)) == 50


def test_timing_alternates_both_steps_on_one_thread():
    threads = torch.get_num_threads()
    timing = harness.time_steps(get_case("gru-lm"), "small", rounds=3, min_seconds=0.001)
    assert torch.get_num_threads() == threads
    assert timing.forward > 0 and timing.forward_gradient > 0 and timing.backprop > 0
    assert timing.ratio_low <= timing.ratio <= timing.ratio_high
    assert timing.rank1 > 0 and timing.rank1_low <= timing.rank1_ratio <= timing.rank1_high


def test_state_table_has_a_row_per_model_and_a_summary():
    row = measure(get_case("gru-lm"), "small", rounds=2)
    assert row.errors[torch.float64] < 1e-9 and row.error is None
    text = format_table([row])
    lines = text.splitlines()
    assert lines[0].startswith("| model | family |") and lines[2].startswith(
        "| gru-lm | recurrent |"
    )
    assert "Fast path: " in lines[-1] and "with rank-1 tangents" in lines[-1]
    assert lines[0].count("|") == lines[2].count("|")  # every header has its cell


def test_command_line_rejects_an_unknown_model(capsys):
    with pytest.raises(SystemExit) as exited:
        zoo_main.main(["no-such-model"])
    assert exited.value.code == 2
    assert "unknown zoo case 'no-such-model'" in capsys.readouterr().err
