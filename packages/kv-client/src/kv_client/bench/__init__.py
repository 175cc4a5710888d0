"""kv_client.bench: closed-loop load generation against kv and the systems it is measured by.

``python -m kv_client.bench --suite smoke|full --out DIR`` starts every target itself (echo,
kv on one and three nodes, etcd and Redis when installed), runs the suite in interleaved
rounds and writes results.json, results.md and results.png. ``kv bench`` (see
``kv_client.bench.cli``) loads an already running cluster.
"""

from kv_client.bench.histogram import Histogram
from kv_client.bench.keys import ScrambledZipfian, Uniform, Zipfian
from kv_client.bench.loadgen import LoadResult, LoadSpec, run_load
from kv_client.bench.workload import WorkloadSpec

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
