"""Workloads: which operations a worker issues, on which keys, with which values.

``write`` is 100% puts; YCSB A is 50% reads / 50% updates, B 95/5, C read-only. An update is
a put of a whole value, as in YCSB with ``writeallfields=true``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from kv_tools.bench.keys import KeyChooser, chooser, key_bytes

READ_FRACTION: dict[str, float] = {"write": 0.0, "A": 0.5, "B": 0.95, "C": 1.0}
WORKLOADS = tuple(READ_FRACTION)

GET = 0
PUT = 1


@dataclass(frozen=True, slots=True)
class Op:
    kind: int  # GET or PUT
    key: bytes
    value: bytes = b""


@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "write"
    keyspace: int = 10_000
    distribution: str = "uniform"
    value_size: int = 100
    batch: int = 1
    seed: int = 1

    def __post_init__(self) -> None:
        if self.name not in READ_FRACTION:
            raise ValueError(f"unknown workload {self.name!r}; choose from {', '.join(WORKLOADS)}")
        if self.keyspace < 1 or self.batch < 1 or self.value_size < 0:
            raise ValueError("keyspace and batch must be positive, value size non-negative")

    @property
    def read_fraction(self) -> float:
        return READ_FRACTION[self.name]

    @property
    def needs_preload(self) -> bool:
        return self.read_fraction > 0


def make_value(size: int, seed: int) -> bytes:
    """Incompressible bytes of ``size`` (random, seeded)."""
    return random.Random(seed).randbytes(size)


class OpStream:
    """One worker's endless, seeded sequence of operations."""

    def __init__(self, spec: WorkloadSpec, worker: int) -> None:
        seed = spec.seed * 1_000_003 + worker
        self._rng = random.Random(seed)
        self._keys: KeyChooser = chooser(spec.distribution, spec.keyspace, seed ^ 0x5EED)
        self._read = spec.read_fraction
        # A few distinct values, so a store cannot get away with deduplicating one.
        self._values = [make_value(spec.value_size, seed + i) for i in range(8)]
        self._batch = spec.batch

    def next_op(self) -> Op:
        key = key_bytes(self._keys.next())
        if self._read >= 1.0 or (self._read > 0 and self._rng.random() < self._read):
            return Op(GET, key)
        return Op(PUT, key, self._values[self._rng.getrandbits(3)])

    def next_batch(self) -> list[Op]:
        return [self.next_op() for _ in range(self._batch)]


def preload_batches(keyspace: int, value_size: int, batch: int = 500) -> Iterator[list[Op]]:
    """Puts that create keys 0..keyspace-1, ``batch`` at a time (generated lazily)."""
    value = make_value(value_size, 0)
    for start in range(0, keyspace, batch):
        yield [Op(PUT, key_bytes(i), value) for i in range(start, min(start + batch, keyspace))]
