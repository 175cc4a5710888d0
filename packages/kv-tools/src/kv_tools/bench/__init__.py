"""kv_tools.bench: closed-loop load generation against kv and the systems it is measured by.

``python -m kv_tools.bench --suite smoke|full --out DIR`` starts every target itself (echo,
kv on one and three nodes, etcd and Redis when installed), runs the suite in interleaved
rounds and writes results.json, results.md and results.png. ``kv bench`` (see
``kv_tools.bench.cli``) loads an already running cluster.
"""

from kv_tools.bench.histogram import Histogram
from kv_tools.bench.keys import ScrambledZipfian, Uniform, Zipfian
from kv_tools.bench.loadgen import LoadResult, LoadSpec, run_load
from kv_tools.bench.workload import WorkloadSpec

__all__ = [
    "Histogram",
    "LoadResult",
    "LoadSpec",
    "ScrambledZipfian",
    "Uniform",
    "WorkloadSpec",
    "Zipfian",
    "run_load",
]
