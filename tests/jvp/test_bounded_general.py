"""The general path with bounded memory (linear layers a block of output features at a time),
which the fast path's first-use check runs: the same numbers as whole layers, from every kind
of tangent source, and a first step whose peak memory is that of the steps after it."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import forwardgrad as fg
from forwardgrad import tangents as tg
from forwardgrad.experiments.memory import reset_high_water_mark
from forwardgrad.jvp.general import BLOCK_VALUES, general_derivatives
from forwardgrad.jvp.replay import Replay


def two_layers():
    torch.manual_seed(0)
    # 600 x 500 weights: more values than one streamed block (DrawnTangents draws by rows).
    return nn.Sequential(nn.Linear(600, 500), nn.Tanh(), nn.Linear(500, 600, bias=False))


SOURCES = {
    "drawn": lambda ps: tg.DrawnTangents(ps, 2, "rademacher", seed=3),
    "drawn rank 2": lambda ps: tg.DrawnTangents(ps, 2, "normal", seed=3, rank=2),
    "held": lambda ps: tg.HeldTangents(ps, 2, "normal", seed=3),
    "held rank 1": lambda ps: tg.HeldTangents(ps, 2, "rademacher", seed=3, rank=1),
    "grad": lambda ps: tg.GradTangents(ps, "normal", seed=3),
    "given": lambda ps: tg.GivenTangents(ps, [torch.randn(2, *p.shape) for p in ps]),
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
@pytest.mark.parametrize("shape", [(4, 600), (3, 2, 600)])
def test_blocks_give_the_whole_layers_numbers(kind, shape):
    model = two_layers()
    x = torch.randn(*shape)
    results = []
    for block_values in (None, 700):  # 700: blocks of 175 or 116 rows, across drawn blocks
        params = list(model.parameters())
        torch.manual_seed(1)
        source = SOURCES[kind](params)
        with torch.no_grad():
            results.append(
                general_derivatives(
                    lambda: model(x).pow(2).mean(), source, Replay(model), None, block_values
                )
            )
        for p in params:
            p.grad = None
    (value, tangent), (blocked_value, blocked_tangent) = results
    assert torch.allclose(blocked_value, value, rtol=1e-5, atol=1e-6)
    scale = float(tangent.abs().max())
    assert torch.allclose(blocked_tangent, tangent, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("rank", [None, 1])
def test_the_check_by_blocks_still_catches_code_the_fast_path_cannot_see(rank):
    class Scripted(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(600, 500), nn.Linear(500, 3)
            self.activation = torch.jit.script(nn.Tanh())

        def forward(self, x):
            return self.second(self.activation(self.first(x)))

    torch.manual_seed(0)
    model, x = Scripted(), torch.randn(80, 600)
    assert x.shape[0] * 500 > BLOCK_VALUES  # the first layer runs by blocks in the check
    optimizer = fg.ForwardSGD(model, 1e-3, seed=0, rank=rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step(lambda: model(x).pow(2).mean())
    assert any(issubclass(w.category, fg.FallbackWarning) for w in caught)
    assert optimizer.last_path == "general"


_PROBE = """
import gc, json, sys, torch, torch.nn.functional as F
from torch import nn
import forwardgrad as fg
from forwardgrad.experiments.memory import reset_high_water_mark, status_bytes

def problem(batch, depth, width):
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    optimizer = fg.ForwardSGD(model, 1e-4, seed=0, distribution="rademacher", rank=RANK)
    return lambda: optimizer.step(lambda: F.cross_entropy(model(x), y))

torch.set_num_threads(1)
problem(4, 1, 8)()  # the library's code and kernels loaded, on a tiny model
step = problem(BATCH, 3, WIDTH)
gc.collect()
resident, peaks = status_bytes("VmRSS"), []
for steps in (1, 2):  # above the same resident size: what the first step leaves counts in both
    reset_high_water_mark()
    for _ in range(steps):
        step()
    peaks.append(status_bytes("VmHWM") - resident)
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not reset_high_water_mark(), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("rank", [None, 1])
def test_the_first_step_takes_no_more_memory_than_the_later_ones(rank):
    # Whole layers on the general path, the first-use check took about 3.5 activations more
    # than a later step (three output-sized temporaries and the weight's tangent); one
    # activation's size is the tolerance: malloc's and the BLAS's own buffers move a little.
    batch, width = 1024, 1024
    code = _PROBE.replace("RANK", repr(rank)).replace("BATCH", str(batch))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", code.replace("WIDTH", str(width))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    first, later = json.loads(done.stdout.splitlines()[-1])
    activation = batch * width * 4
    assert first <= later + activation, (first / 2**20, later / 2**20)
