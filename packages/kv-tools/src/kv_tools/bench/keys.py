"""Key choosers: uniform and zipfian, seeded, O(1) per draw.

The zipfian generator is the one YCSB uses (Gray et al., "Quickly generating billion-record
synthetic databases", SIGMOD 1994): after computing the generalized harmonic number
``zeta(n, theta)`` once, each draw costs one random number and one ``pow``. Rank 0 is the
hottest item. ``zeta`` is summed exactly for the first terms and the tail is closed with the
Euler-Maclaurin formula, so a keyspace of 10^8 costs no more to set up than one of 10^4.

``ScrambledZipfian`` spreads the hot ranks over the keyspace (YCSB's default), so the
hottest keys are not also neighbours in key order.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

DEFAULT_THETA = 0.99
"""YCSB's default skew (the constant ``ZipfianGenerator.ZIPFIAN_CONSTANT``)."""

_EXACT_TERMS = 10_000


def zeta(n: int, theta: float) -> float:
    """sum(i ** -theta for i in 1..n), exact for small n, Euler-Maclaurin for the tail."""
    if n <= _EXACT_TERMS:
        return math.fsum(i**-theta for i in range(1, n + 1))
    head = math.fsum(i**-theta for i in range(1, _EXACT_TERMS))
    a, b = float(_EXACT_TERMS), float(n)
    if theta == 1.0:
        integral = math.log(b / a)
    else:
        integral = (b ** (1 - theta) - a ** (1 - theta)) / (1 - theta)
    ends = (a**-theta + b**-theta) / 2
    slope = theta / 12 * (a ** (-theta - 1) - b ** (-theta - 1))
    return float(head + integral + ends + slope)


class KeyChooser(Protocol):
    n: int

    def next(self) -> int:
        """A key index in [0, n)."""
        ...


class Uniform:
    def __init__(self, n: int, rng: random.Random) -> None:
        if n < 1:
            raise ValueError("keyspace must hold at least one key")
        self.n = n
        self._rng = rng

    def next(self) -> int:
        return self._rng.randrange(self.n)


class Zipfian:
    """Ranks 0..n-1 with P(rank k) proportional to 1 / (k + 1) ** theta."""

    def __init__(self, n: int, rng: random.Random, theta: float = DEFAULT_THETA) -> None:
        if n < 1:
            raise ValueError("keyspace must hold at least one key")
        if not 0 < theta < 1:
            raise ValueError("theta must be in (0, 1) for this generator")
        self.n = n
        self.theta = theta
        self._rng = rng
        self._zetan = zeta(n, theta)
        zeta2 = 1 + 0.5**theta
        self._alpha = 1 / (1 - theta)
        self._half_pow = 1 + 0.5**theta
        self._eta = (1 - (2 / n) ** (1 - theta)) / (1 - zeta2 / self._zetan) if n > 2 else 0.0

    def probability(self, rank: int) -> float:
        """The exact zipf probability of ``rank`` (what the generator approximates)."""
        return float((rank + 1) ** -self.theta / self._zetan)

    def next(self) -> int:
        u = self._rng.random()
        uz = u * self._zetan
        if uz < 1.0 or self.n == 1:
            return 0
        if uz < self._half_pow or self.n == 2:
            return 1
        rank = int(self.n * (self._eta * u - self._eta + 1) ** self._alpha)
        return min(rank, self.n - 1)


_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def fnv1a64(value: int) -> int:
    """FNV-1a over the 8 little-endian bytes of ``value`` (YCSB's scrambling hash)."""
    h = _FNV_OFFSET
    for _ in range(8):
        h ^= value & 0xFF
        h = (h * _FNV_PRIME) & _MASK64
        value >>= 8
    return h


class ScrambledZipfian:
    """Zipfian popularity, with the popular ranks hashed to scattered key indexes."""

    def __init__(self, n: int, rng: random.Random, theta: float = DEFAULT_THETA) -> None:
        self.n = n
        self._zipf = Zipfian(n, rng, theta)

    def next(self) -> int:
        return fnv1a64(self._zipf.next()) % self.n


DISTRIBUTIONS = ("uniform", "zipfian")


def chooser(distribution: str, n: int, seed: int) -> KeyChooser:
    rng = random.Random(seed)
    if distribution == "uniform":
        return Uniform(n, rng)
    if distribution == "zipfian":
        return ScrambledZipfian(n, rng)
    raise ValueError(f"unknown key distribution {distribution!r}; choose from {DISTRIBUTIONS}")


KEY_BYTES = 16


def key_bytes(index: int) -> bytes:
    """The 16-byte key for a key index: b'k' and 15 digits."""
    return b"k%015d" % index
