"""Results out: JSON (everything, histograms included), Markdown tables, a PNG chart."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import ticker
from matplotlib.figure import Figure

from kv_tools.bench.suite import Aggregate, RatioResult, SuiteResult


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import grpc

        grpc_version = grpc.__version__
    except (ImportError, AttributeError):
        grpc_version = "unknown"
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "grpcio": grpc_version,
        "commit": commit,
    }


def _fmt_ops(value: float) -> str:
    return f"{value:,.0f}"


def results_table(aggregates: Sequence[Aggregate]) -> str:
    lines = [
        "| configuration | ops/s (median) | min-max | p50 ms | p95 ms | p99 ms | p99.9 ms "
        "| CPU client/server | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for agg in aggregates:
        ops = agg.ops_per_sec()
        lat = agg.latency_ms()
        cpu = agg.cpu()
        server = f"{cpu['server']:.2f}" if cpu["server"] else "-"
        lines.append(
            f"| {agg.config.label} | {_fmt_ops(ops['median'])} "
            f"| {_fmt_ops(ops['min'])}-{_fmt_ops(ops['max'])} "
            f"| {lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} | {lat['p99.9']:.2f} "
            f"| {cpu['client']:.2f}/{server} | {agg.errors} |"
        )
    return "\n".join(lines)


def ratios_table(ratios: Sequence[RatioResult]) -> str:
    lines = [
        "| ratio (ops/s, same run) | median | min-max | target | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for result in ratios:
        summary = result.summary()
        if summary is None:
            median = spread = "-"
        else:
            median = f"{summary['median']:.2f}x"
            spread = f"{summary['min']:.2f}-{summary['max']:.2f}"
        lines.append(
            f"| {result.ratio.name} | {median} | {spread} | >= {result.ratio.target:g}x "
            f"| {result.verdict()} |"
        )
    return "\n".join(lines)


def memory_table(memory: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| engine | keys | bytes/key stored | x raw (116 B) | RSS delta/key | disk delta/key "
        "| fill keys/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in memory:
        if "error" in m:
            lines.append(f"| {m['engine']} | - | error: {m['error']} | | | | |")
            continue
        lines.append(
            f"| {m['engine']} | {m['keys']:,} | {m['bytes_per_key']:.0f} | {m['overhead_x']:.2f} "
            f"| {m['rss_bytes_per_key']:.0f} | {m['disk_bytes_per_key']:.0f} "
            f"| {m['fill_keys_per_sec']:,.0f} |"
        )
    return "\n".join(lines)


def cluster_memory_table(memory: Sequence[dict[str, Any]]) -> str:
    """Bytes per key of replicated clusters, every copy counted, and per member."""
    lines = [
        "| cluster | keys | RSS delta/key, all members | per member | disk delta/key, all members "
        "(allocated / apparent) | per member | fill keys/s | batches resent | keys lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in memory:
        if "error" in m:
            lines.append(f"| {m['target']} | - | error: {m['error']} | | | | | | |")
            continue
        lines.append(
            f"| {m['target']} ({m['members']} members) | {m['keys']:,} "
            f"| {m['rss_bytes_per_key']:.0f} | {m['rss_bytes_per_key_per_member']:.0f} "
            f"| {m['disk_bytes_per_key']:.0f} / {m['disk_apparent_bytes_per_key']:.0f} "
            f"| {m['disk_bytes_per_key_per_member']:.0f} | {m['fill_keys_per_sec']:,.0f} "
            f"| {m['batches_resent']} | {m['keys_lost']} |"
        )
    return "\n".join(lines)


def idle_table(idle: Sequence[dict[str, Any]]) -> str:
    """Start to SERVING and idle CPU of 3-node RF=3 clusters, with the load beside them."""
    lines = [
        "| cluster | partitions | start to SERVING s | start to all writable s "
        "| load avg at start | idle CPU per node (% of one core) "
        "| per 5 s slice, mean of nodes | load avg while idle |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for m in idle:
        if "error" in m:
            cluster = m.get("cluster", "3 nodes RF=3")
            lines.append(f"| {cluster} | {m['partitions']} | error: {m['error']} | | | | | |")
            continue
        default_cluster = f"{m['nodes']} nodes RF={m['replication_factor']}"
        cpu = m.get("idle_cpu_percent", {})
        per_node = ", ".join(f"{name.rsplit('-', 1)[-1]} {v:.1f}" for name, v in cpu.items())
        slices = ", ".join(f"{v:.1f}" for v in m.get("idle_cpu_percent_per_node_by_slice", []))
        load_idle = (
            f"{m['loadavg_idle_before']:.1f} / {m['loadavg_idle_after']:.1f}"
            if "loadavg_idle_before" in m
            else "-"
        )
        lines.append(
            f"| {m.get('cluster') or default_cluster} | {m['partitions']} "
            f"| {m['start_to_serving_s']:.2f} | {m.get('start_to_writable_s', '-')} "
            f"| {m['loadavg_at_start']:.1f} "
            f"| {per_node or '-'} | {slices or '-'} | {load_idle} |"
        )
    return "\n".join(lines)


def markdown(result: SuiteResult, info: dict[str, Any]) -> str:
    s = result.settings
    parts = [
        f"Run {info['date_utc']} on {info['nproc']} CPUs ({info['cpu']}), "
        f"Python {info['python']}, grpcio {info['grpcio']}"
        + (f", commit {info['commit']}" if info.get("commit") else "")
        + ".",
        f"{s['rounds']} rounds x {s['duration_s']:g} s (+{s['warmup_s']:g} s warm-up), "
        f"keyspace {s['keyspace']:,}, {s['value_size']}-byte values, 16-byte keys. "
        "Figures are medians over rounds; latency is per request; CPU is in cores used by the "
        "load generator / by the target's processes.",
        *(
            [
                f"Load average (1 min) before/after the run: {s['loadavg_before']:.1f} / "
                f"{s['loadavg_after']:.1f} on {info['nproc']} CPUs."
            ]
            if "loadavg_before" in s
            else []
        ),
        "",
        results_table(list(result.aggregates.values())),
        "",
        ratios_table(result.ratios),
    ]
    if s.get("preload_failed"):
        parts += ["", "Preload incomplete (reads of these keys find nothing):"]
        parts += [
            f"- {name}: {n:,} of {s['keyspace']:,} puts failed"
            for name, n in s["preload_failed"].items()
        ]
    if result.unavailable:
        parts += ["", "Not measured:"]
        parts += [f"- {name}: {why}" for name, why in result.unavailable.items()]
    if result.memory:
        parts += ["", memory_table(result.memory)]
    if result.cluster_memory:
        parts += ["", cluster_memory_table(result.cluster_memory)]
    if result.idle:
        parts += ["", idle_table(result.idle)]
    return "\n".join(parts) + "\n"


def to_json(result: SuiteResult, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": info,
        "settings": result.settings,
        "results": [a.to_dict() for a in result.aggregates.values()],
        "ratios": [r.to_dict() for r in result.ratios],
        "unavailable": result.unavailable,
        "memory": result.memory,
        "cluster_memory": result.cluster_memory,
        "idle": result.idle,
    }


def chart(result: SuiteResult, path: Path, title: str = "kv benchmark") -> Path | None:
    """Throughput per configuration (with min-max) and its latency percentiles, as a PNG.

    Returns None when there is nothing to draw. Draws on a bare ``Figure`` (no pyplot), so no
    display and no global backend are involved.
    """
    aggregates = [a for a in result.aggregates.values() if a.rounds]
    if not aggregates:
        return None
    labels = [a.config.label for a in aggregates]
    ops = [a.ops_per_sec() for a in aggregates]
    medians = [o["median"] for o in ops]
    low = [o["median"] - o["min"] for o in ops]
    high = [o["max"] - o["median"] for o in ops]
    height = max(4.0, 0.38 * len(labels) + 1.5)
    fig = Figure(figsize=(15, height))
    left, right = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1.2, 1]})
    positions = list(range(len(labels)))
    colors = [_color(a.config.target) for a in aggregates]
    left.barh(positions, medians, xerr=[low, high], color=colors, capsize=2)
    left.set_yticks(positions, labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("operations/s (median, bars: min-max over rounds)")
    left.set_xscale("log")
    left.grid(axis="x", which="both", alpha=0.3)
    for y, value, top in zip(positions, medians, (o["max"] for o in ops), strict=True):
        left.text(top * 1.05, y, f"{value:,.0f}", va="center", fontsize=7)
    left.set_xlim(right=max(o["max"] for o in ops) * 3)
    percentile_keys = ("p50", "p95", "p99", "p99.9")
    width = 0.2
    for i, key in enumerate(percentile_keys):
        values = [a.latency_ms()[key] for a in aggregates]
        right.barh([p + (i - 1.5) * width for p in positions], values, height=width, label=key)
    right.set_xscale("log")
    right.xaxis.set_minor_formatter(ticker.NullFormatter())
    right.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    right.set_xlabel("request latency, ms (median over rounds)")
    right.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=4)
    right.grid(axis="x", which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _color(target: str) -> str:
    if target == "echo":
        return "#9e9e9e"
    if target.startswith("kv"):
        return "#1f77b4"
    if target.startswith("etcd"):
        return "#2ca02c"
    return "#d62728"


def write_all(
    result: SuiteResult, out: Path, title: str, info: dict[str, Any] | None = None
) -> tuple[str, list[Path]]:
    """Write results.json, results.md and results.png into ``out``; returns the Markdown.

    ``info`` is ``machine()`` taken when the run started (the commit may move during a run).
    """
    out.mkdir(parents=True, exist_ok=True)
    info = info or machine()
    text = markdown(result, info)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(to_json(result, info), indent=1) + "\n")
    written[1].write_text(f"# {title}\n\n{text}")
    png = chart(result, out / "results.png", title)
    if png is not None:
        written.append(png)
    return text, written
