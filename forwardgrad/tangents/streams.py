"""Seeded tangent streams: parameter i's k-th tangent in a step is a pure function of the step's
seed, i and k, so a caller can draw it just before its layer runs and again for the update
instead of holding it (``ForwardSGD``, the memory-lean stacked-tangent evaluation).

Tangents for K directions over a list of parameter tensors are a list of tensors shaped
``(K, *param.shape)``: entry k of every tensor, taken together, is the k-th direction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from forwardgrad.errors import ConfigurationError
from forwardgrad.seeds import derive_seed, draw_seed, seeded_generator
from forwardgrad.tangents.distributions import STREAMABLE, check_count, check_distribution


def sample_tangents(
    params: Sequence[torch.Tensor],
    count: int,
    distribution: str = "normal",
    generator: torch.Generator | None = None,
    rank: int | None = None,
) -> list[torch.Tensor]:
    """Draw ``count`` random directions over ``params``.

    Every distribution has E[v vᵀ] = I over the flattened parameters:

    - ``"normal"``: v ~ N(0, I).
    - ``"rademacher"``: independent ±1 signs.
    - ``"orthogonal"``: v_k = √n q_k with q_1..q_K orthonormal and Haar-distributed (QR of a
      Gaussian matrix with the sign fix of Mezzadri 2007), n the total number of parameters;
      needs K <= n.

    Normal and Rademacher tangents take one seed from ``generator`` (``draw_seed``) and give
    parameter i the tangents ``parameter_tangents(params[i], K, distribution, seed, i)``, so
    that each can be drawn again alone, when it is needed, from the seed. With ``rank`` the
    matrices get the structured tangents of ``tangents.structured``, materialised.

    Args:
      params: tensors whose shapes, dtypes and devices the tangents take.
      count: K, the number of directions.
      distribution: one of ``DISTRIBUTIONS``.
      generator: the source of randomness; ``None`` uses torch's global generator.
      rank: None (dense) or r >= 1, the rank of the matrices' tangents (normal, rademacher).

    Returns:
      A list with one tensor of shape ``(K, *p.shape)`` per parameter.
    """
    from forwardgrad.tangents import structured  # it draws with this module's streams

    check_count(count)
    check_distribution(distribution)
    rank = structured.check_structured(rank, distribution)
    if distribution == "orthogonal":
        return _orthogonal(params, count, generator)
    seed = draw_seed(generator)
    return [
        structured.structured_tangents(p, count, distribution, seed, i, rank)
        for i, p in enumerate(params)
    ]


# Values per stream. Fixed, so the numbers do not depend on how many threads draw them.
CHUNK = 1 << 18


def parameter_tangents(
    like: torch.Tensor,
    count: int,
    distribution: str,
    seed: int,
    index: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``count`` tangents of parameter ``index`` in the step seeded by ``seed``.

    Entry k (shape of ``like``) is a pure function of ``(seed, index, k)``, the distribution and
    ``like``'s shape and dtype: drawing it again gives the same numbers. Values come in streams
    of ``CHUNK``, each its own generator on ``device`` (default: ``like``'s), so that the two
    halves of a large tensor can be drawn on two threads with the same result.

    Args:
      like: the parameter whose shape and dtype the tangents take.
      count: K.
      distribution: ``"normal"`` or ``"rademacher"`` (orthogonal tangents couple all
        parameters; see ``sample_tangents``).
      seed: the step's seed (``draw_seed``).
      index: the parameter's position in the model's list of trainable parameters.
      device: where the random numbers are drawn; the result is moved to ``like``'s device.

    Returns:
      A tensor of shape ``(count, *like.shape)``.
    """
    check_distribution(distribution, STREAMABLE)
    device = torch.device(device) if device is not None else like.device
    out = torch.empty((count, *like.shape), dtype=like.dtype, device=device)
    for k in range(count):
        fill_tangent(out[k], distribution, seed, index, k)
    return out.to(like.device)


def fill_tangent(
    out: torch.Tensor, distribution: str, seed: int, index: int, k: int
) -> torch.Tensor:
    """Write tangent k of parameter ``index`` for step ``seed`` into ``out`` (contiguous), in place.

    The same numbers as ``parameter_tangents(out, ...)[k]``; this form lets a caller reuse a
    buffer, e.g. ``.grad``.
    """
    flat = out.view(-1)
    chunks = [
        (flat[start : start + CHUNK], derive_seed(seed, index, k, start // CHUNK))
        for start in range(0, flat.numel(), CHUNK)
    ]
    if distribution == "rademacher":  # each integer pass is already parallel inside torch
        for chunk in chunks:
            _fill_rademacher(*chunk)
    elif len(chunks) > 1 and flat.device.type == "cpu" and torch.get_num_threads() > 1:
        # torch's normal_ draws its uniforms serially; independent streams need not.
        list(_pool().map(lambda chunk: _fill_normal(*chunk), chunks))
    else:
        for chunk in chunks:
            _fill_normal(*chunk)
    return out


def parameter_row_blocks(
    like: torch.Tensor,
    count: int,
    distribution: str,
    seed: int,
    index: int,
    block_values: int = CHUNK,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``parameter_tangents(like, count, distribution, seed, index)`` a block of rows at a time.

    Yields ``(start, stop, block)`` in row order, ``block`` equal to
    ``parameter_tangents(...)[:, start:stop]``, so that a caller never holds more than about
    ``block_values`` values per tangent of a large matrix (a linear layer's weight, an embedding
    table). Each stream is drawn once: values past a block's last row wait for the next block.

    Args:
      like: the parameter (at least one dimension) whose shape and dtype the tangents take.
      count, distribution, seed, index: as for ``parameter_tangents``.
      block_values: about how many values of each tangent a block holds (at least one row).
    """
    check_distribution(distribution, STREAMABLE)
    rows = like.shape[0]
    width = like[0].numel() if rows else 0
    total = rows * width
    per_block = max(1, block_values // max(width, 1))
    fill = _fill_rademacher if distribution == "rademacher" else _fill_normal
    carried = [like.new_empty(0) for _ in range(count)]  # drawn, not yet yielded
    drawn = 0  # values drawn so far, per tangent
    for start in range(0, rows, per_block):
        stop = min(rows, start + per_block)
        streams = []
        while drawn < stop * width:
            streams.append((drawn // CHUNK, min(CHUNK, total - drawn)))
            drawn += streams[-1][1]
        size = (stop - start) * width
        block = None if count == 1 else like.new_empty((count, stop - start, *like.shape[1:]))
        for k in range(count):
            length = carried[k].numel() + sum(n for _, n in streams)
            values = torch.empty(length, dtype=like.dtype, device=like.device)
            values[: carried[k].numel()] = carried[k]
            offset = carried[k].numel()
            for stream, n in streams:
                chunk = values[offset : offset + n]
                fill(chunk, derive_seed(seed, index, k, stream))
                offset += n
            carried[k] = values[size:].clone()
            if block is None:  # K = 1: a view, no copy
                block = values[:size].view(1, stop - start, *like.shape[1:])
            else:
                block[k].view(-1).copy_(values[:size])
        yield start, stop, block


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="forwardgrad-tangents")
    return _POOL


def _fill_normal(out: torch.Tensor, seed: int) -> None:
    out.normal_(generator=seeded_generator(seed, out.device))


# Per floating dtype: the integer type of the same width and the bit pattern of +1.0.
_FLOAT_BITS = {
    torch.float32: (torch.int32, 0x3F800000),
    torch.float64: (torch.int64, 0x3FF0000000000000),
    torch.float16: (torch.int16, 0x3C00),
    torch.bfloat16: (torch.int16, 0x3F80),
}


def _fill_rademacher(out: torch.Tensor, seed: int) -> None:
    # 64 signs from every 64 random bits: one generator call per word, not one per sign as with
    # bernoulli_. Bit j of a word becomes the sign bit of +1.0 in lane j: three integer passes.
    size = out.numel()
    words = torch.empty((size + 63) // 64, dtype=torch.int64, device=out.device)
    words.random_(-(2**63), None, generator=seeded_generator(seed, out.device))
    if out.dtype not in _FLOAT_BITS:
        bits = (words.view(torch.uint8).unsqueeze(1) >> torch.arange(8, device=out.device)) & 1
        out.copy_(1 - 2 * bits.view(-1)[:size].to(out.dtype))
        return
    integer, one = _FLOAT_BITS[out.dtype]
    lanes = torch.iinfo(integer).bits
    lane_words = words.view(integer)
    whole = size // lanes
    _signs_into(lane_words[:whole], one, out[: whole * lanes].view(integer).view(whole, lanes))
    if size % lanes:
        tail = torch.empty(1, lanes, dtype=integer, device=out.device)
        _signs_into(lane_words[whole : whole + 1], one, tail)
        out[whole * lanes :].view(integer).copy_(tail.view(-1)[: size % lanes])


_SHIFTS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _signs_into(words: torch.Tensor, one: int, out: torch.Tensor) -> None:
    """out[w, j] = the bits of +1.0 with the sign bit set to bit j of ``words[w]``."""
    key = (out.dtype, out.device)
    if key not in _SHIFTS:
        lanes = out.shape[1]
        _SHIFTS[key] = torch.arange(lanes - 1, -1, -1, dtype=out.dtype, device=out.device)
    torch.bitwise_left_shift(words.unsqueeze(1), _SHIFTS[key], out=out)  # bit j to the top
    out.bitwise_and_(torch.iinfo(out.dtype).min).bitwise_or_(one)


def _orthogonal(
    params: Sequence[torch.Tensor], count: int, generator: torch.Generator | None
) -> list[torch.Tensor]:
    n = sum(p.numel() for p in params)
    if count > n:
        raise ConfigurationError(
            f"orthogonal tangents need tangents <= the number of parameters ({n}), got {count}; "
            "use fewer tangents or the 'normal' distribution."
        )
    device = generator.device if generator is not None else params[0].device
    gaussian = torch.randn(n, count, dtype=torch.float64, device=device, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    directions = (q * signs).T.mul_(math.sqrt(n))  # (K, n)
    out, start = [], 0
    for p in params:
        chunk = directions[:, start : start + p.numel()]
        out.append(chunk.reshape(count, *p.shape).to(dtype=p.dtype, device=p.device))
        start += p.numel()
    return out
