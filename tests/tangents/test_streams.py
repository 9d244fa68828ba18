"""Seeded tangent streams: a parameter's tangent is a pure function of (seed, index, k), drawn
in fixed chunks (the same numbers on any number of threads), whole or a block of rows at a time."""

import math

import pytest
import torch

from forwardgrad import tangents as tg
from forwardgrad.seeds import derive_seed

# --- Tangent streams and samplers ------------------------------------------------------------


@pytest.mark.parametrize("distribution", tg.STREAMABLE)
def test_parameter_tangents_are_a_function_of_seed_index_and_k(distribution):
    like = torch.zeros(3, 5)
    a = tg.parameter_tangents(like, 3, distribution, seed=11, index=2)
    assert a.shape == (3, 3, 5)
    assert torch.equal(a, tg.parameter_tangents(like, 3, distribution, 11, 2))
    # tangent k does not depend on K, and fill_tangent draws the same numbers in place
    assert torch.equal(a[:1], tg.parameter_tangents(like, 1, distribution, 11, 2))
    buffer = torch.empty(3, 5)
    assert torch.equal(tg.fill_tangent(buffer, distribution, 11, 2, 1), a[1])
    for other in [(12, 2), (11, 3)]:
        assert not torch.equal(a, tg.parameter_tangents(like, 3, distribution, *other))
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("distribution", tg.STREAMABLE)
def test_streams_do_not_depend_on_the_number_of_threads(distribution):
    like = torch.zeros(2 * tg.CHUNK + 5)  # three streams, drawn on two threads when allowed
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tg.parameter_tangents(like, 1, distribution, 5, 0)
        torch.set_num_threads(2)
        two = tg.parameter_tangents(like, 1, distribution, 5, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 7, 63, 64, 1000, tg.CHUNK + 33])
def test_rademacher_signs_for_every_dtype_and_size(dtype, size):
    v = tg.parameter_tangents(torch.zeros(size, dtype=dtype), 1, "rademacher", 3, 0)[0]
    assert v.dtype == dtype
    assert set(v.unique().tolist()) <= {-1.0, 1.0}
    if size >= 1000:
        # the mean of n fair signs has standard deviation 1/sqrt(n)
        assert abs(v.double().mean().item()) < 5 / math.sqrt(size)


@pytest.mark.parametrize("distribution", tg.STREAMABLE)
@pytest.mark.parametrize(
    ("shape", "block_values"),
    [((3, 5), tg.CHUNK), ((1000, 700), 1000), ((700, 1000), 1000), ((2, tg.CHUNK + 7), 10)]
    + [((4, 3, 300), 1000), ((1, 1), 1)],
)
def test_row_blocks_are_the_tangent_in_pieces(distribution, shape, block_values):
    like = torch.zeros(shape)
    blocks = list(tg.parameter_row_blocks(like, 2, distribution, 7, 3, block_values))
    assert [b[0] for b in blocks] == [0] + [b[1] for b in blocks[:-1]]  # consecutive rows
    assert blocks[-1][1] == shape[0]
    whole = torch.cat([block for _, _, block in blocks], dim=1)
    assert torch.equal(whole, tg.parameter_tangents(like, 2, distribution, 7, 3))


def test_rademacher_bits_are_independent_across_positions():
    v = tg.parameter_tangents(torch.zeros(64 * 4096), 1, "rademacher", 9, 0)[0].view(-1, 64)
    # E[v_i v_j] = 0 for i != j; each empirical correlation has std 1/sqrt(4096)
    correlation = (v.T @ v) / v.shape[0]
    off_diagonal = correlation - torch.eye(64)
    assert off_diagonal.abs().max() < 5 / math.sqrt(v.shape[0])


def test_normal_moments():
    n = 200_000
    v = tg.parameter_tangents(torch.zeros(n, dtype=torch.float64), 1, "normal", 4, 0)[0]
    # sample mean ~ N(0, 1/n), sample variance ~ N(1, 2/n)
    assert abs(v.mean().item()) < 5 / math.sqrt(n)
    assert abs(v.var().item() - 1) < 5 * math.sqrt(2 / n)


def test_stream_seeds_separate_nearby_keys():
    seeds = {
        derive_seed(s, i, k, c)
        for s in range(3)
        for i in range(3)
        for k in range(3)
        for c in range(3)
    }
    assert len(seeds) == 81
    assert all(0 <= s < 2**63 for s in seeds)
