"""One way to derive seeds: every random stream in forwardgrad is a pure function of its keys.

A run's seed, a purpose (``"tangents"``, ``"data"``, ``"init"``), a step, a parameter's index, a
tangent's number and a chunk's position all go through ``derive_seed``, so nearby keys give
unrelated streams and the same keys give the same numbers on every process and machine.
"""

from __future__ import annotations

import functools
import hashlib

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _key_value(key: int | str) -> int:
    if isinstance(key, str):  # a purpose: hashed, so that any name is a key
        return _name_value(key)
    return int(key) & _MASK64


@functools.lru_cache(maxsize=256)
def _name_value(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that hashes ``keys`` (integers and names) with splitmix64.

    Example: ``derive_seed(run_seed, "tangents")`` seeds an estimator; ``derive_seed(step_seed,
    index, k, chunk)`` seeds one chunk of one parameter's k-th tangent.
    """
    value = 0
    for key in keys:
        value = _splitmix64(value ^ _key_value(key))
    return value >> 1


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One fresh seed from ``generator`` (``None``: torch's global generator)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator
