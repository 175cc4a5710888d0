"""A compact log-linear latency histogram (the HdrHistogram layout, in pure Python).

Values are non-negative integers (the load generator records nanoseconds). Values below
``2**SUB_BITS`` get one bucket each; above that, every power-of-two range is split into
``2**(SUB_BITS - 1)`` equal buckets, so a bucket is never wider than ``1 / 2**(SUB_BITS - 1)``
of the values in it (0.8% with the default 8 bits). Memory is a few thousand counters however
many values are recorded, and two histograms merge by adding counters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

SUB_BITS = 8
"""Precision: bucket width is at most 2**-(SUB_BITS-1) of the value (0.8%)."""


class Histogram:
    __slots__ = ("_counts", "_half", "_linear", "count", "max", "min", "sub_bits", "total")

    def __init__(self, sub_bits: int = SUB_BITS) -> None:
        if not 2 <= sub_bits <= 16:
            raise ValueError("sub_bits must be between 2 and 16")
        self.sub_bits = sub_bits
        self._linear = 1 << sub_bits
        self._half = self._linear >> 1
        self._counts: list[int] = [0] * self._linear
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def _index(self, value: int) -> int:
        if value < self._linear:
            return value
        shift = value.bit_length() - self.sub_bits
        return self._linear + (shift - 1) * self._half + ((value >> shift) - self._half)

    def _bounds(self, index: int) -> tuple[int, int]:
        """The [low, high) range of values that land in bucket ``index``."""
        if index < self._linear:
            return index, index + 1
        shift, offset = divmod(index - self._linear, self._half)
        shift += 1
        low = (self._half + offset) << shift
        return low, low + (1 << shift)

    def record(self, value: int, times: int = 1) -> None:
        if value < 0:
            raise ValueError("histogram values must be non-negative")
        index = self._index(value)
        counts = self._counts
        if index >= len(counts):
            counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += times
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += times
        self.total += value * times

    def merge(self, other: Histogram) -> None:
        if other.sub_bits != self.sub_bits:
            raise ValueError("cannot merge histograms of different precision")
        if other.count == 0:
            return
        if len(other._counts) > len(self._counts):
            self._counts.extend([0] * (len(other._counts) - len(self._counts)))
        for index, n in enumerate(other._counts):
            if n:
                self._counts[index] += n
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, p: float) -> float:
        """The value at percentile ``p`` (0..100), to the bucket's precision.

        Uses the nearest-rank definition (the smallest value with at least p% of the values
        at or below it) and answers the middle of that value's bucket, clamped to the
        exact minimum and maximum seen (the last rank is the exact maximum).
        """
        if not 0 <= p <= 100:
            raise ValueError("percentile must be between 0 and 100")
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(round(self.count * p / 100, 6)))  # round: 99.9% of 1000 is 999
        if rank >= self.count:
            return float(self.max)
        seen = 0
        for index, n in enumerate(self._counts):
            seen += n
            if seen >= rank:
                low, high = self._bounds(index)
                middle = low if high - low == 1 else (low + high - 1) / 2
                return float(min(max(middle, self.min), self.max))
        return float(self.max)

    def percentiles(self, ps: Iterable[float]) -> dict[str, float]:
        return {f"p{p:g}": self.percentile(p) for p in ps}

    def to_dict(self) -> dict[str, Any]:
        """A compact form (non-zero buckets only) for JSON results."""
        return {
            "sub_bits": self.sub_bits,
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": {str(i): n for i, n in enumerate(self._counts) if n},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        histogram = cls(int(data["sub_bits"]))
        buckets = {int(i): int(n) for i, n in data["buckets"].items()}
        if buckets:
            histogram._counts.extend([0] * max(0, max(buckets) + 1 - len(histogram._counts)))
        for index, n in buckets.items():
            histogram._counts[index] = n
        histogram.count = int(data["count"])
        histogram.total = int(data["total"])
        histogram.min = int(data["min"])
        histogram.max = int(data["max"])
        return histogram
