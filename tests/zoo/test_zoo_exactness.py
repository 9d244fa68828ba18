"""Every zoo model: the K = 1 forward gradient against autograd along the same direction, in
train and eval mode, float32 and float64.

Models the engine cannot run yet are ``xfail(strict=True)`` with today's error, so that the
test says so (XPASS fails) the day a route lands; then delete their line in KNOWN_FAILURES.
"""

import pytest
import torch

from forwardgrad.zoo import CASES
from forwardgrad.zoo.harness import check_exactness

# Relative error of the estimate d·v against d_exact·v. float32: the target; float64:
# rounding of a few hundred operations, far below any wrong rule (those are off by > 1e-4).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}

# case -> (dtypes it fails in, today's error). Empty: LSTM in float32 (oneDNN), packed sequences,
# weight_norm and EmbeddingBag, which stopped with an error, now have routes.
KNOWN_FAILURES: dict[str, tuple[tuple[torch.dtype, ...], str]] = {}


def _params():
    for name, case in CASES.items():
        for dtype in (torch.float32, torch.float64):
            marks = []
            failing = KNOWN_FAILURES.get(name)
            if failing is not None and dtype in failing[0]:
                marks.append(pytest.mark.xfail(strict=True, reason=failing[1]))
            yield pytest.param(
                case, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}", marks=marks
            )


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("case", "dtype"), list(_params()))
def test_forward_gradient_matches_autograd(case, dtype, train):
    reason = case.unavailable()
    if reason is not None:
        pytest.skip(reason)
    result = check_exactness(case, "small", dtype, train)
    assert result.error is None, result.error
    tolerance = TOLERANCE[torch.float32 if case.float32_limited else dtype]
    assert result.relative_error <= tolerance, (
        f"{case.name}: forward gradient {result.derivative:.10g} vs autograd "
        f"{result.exact:.10g} along the same direction (path {result.path})"
    )


def test_known_failures_name_real_cases():
    assert set(KNOWN_FAILURES) <= set(CASES)
