"""The kv command line as a user runs it: cluster up, put/get/locate, status, restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

KV = [sys.executable, "-m", "kv_tools.cli"]


def kv(*args: str, addresses: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KV, "--addr", addresses, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def start_cluster(data: Path, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [*KV, "cluster", "up", "--data", str(data), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen.append(line)
        if line.startswith("Ctrl-C stops every node") or not line:
            break
    assert any("kv cluster of" in line for line in seen), "".join(seen)
    return process


def stop_cluster(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    return out


def test_cluster_up_cli_round_trip_and_restart(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    process = start_cluster(data, "--nodes", "2")
    try:
        layout = json.loads((data / "cluster.json").read_text())
        addresses = ",".join(node["address"] for node in layout["nodes"])
        assert [node["node_id"] for node in layout["nodes"]] == ["n1", "n2"]

        put = kv("put", "greeting", "hello", addresses=addresses)
        assert put.returncode == 0 and put.stdout.strip().isdigit(), put
        got = kv("get", "greeting", addresses=addresses)
        assert (got.returncode, got.stdout) == (0, "hello\n")
        missing = kv("get", "nope", addresses=addresses)
        assert missing.returncode == 1 and "not found" in missing.stderr
        cas = kv("put", "greeting", "x", "--if-absent", addresses=addresses)
        assert cas.returncode == 1 and "condition failed" in cas.stderr
        where = kv("locate", "greeting", addresses=addresses)
        assert where.returncode == 0 and "partition:" in where.stdout and "owner:" in where.stdout
        status = kv("cluster", "status", addresses=addresses)
        assert status.returncode == 0, status
        assert status.stdout.count(" up ") == 2
        bad = kv("put", "", "v", addresses=addresses)
        assert bad.returncode == 2 and "key must not be empty" in bad.stderr
    finally:
        out = stop_cluster(process)
    assert "stopped 2 nodes" in out

    # Same --data: the same nodes come back with their data.
    process = start_cluster(data)
    try:
        again = kv("get", "greeting", addresses=addresses)
        assert (again.returncode, again.stdout) == (0, "hello\n")
    finally:
        stop_cluster(process)


def test_cli_reports_an_unreachable_cluster() -> None:
    result = kv("--timeout", "1", "get", "k", addresses="127.0.0.1:1")
    assert result.returncode == 2
    assert "no node answered" in result.stderr
