"""The kv command line as a user runs it: cluster up, put/get/delete/locate, status, and a
local cluster that survives a node's death and mends it from another terminal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kv_client import Client
from kv_tools import launcher

KV = [sys.executable, "-m", "kv_tools.cli"]
COMMAND_TIMEOUT = 60.0
UP_TIMEOUT = 60.0
BANNER_END = "Ctrl-C stops every node"


def kv(
    *args: str, addresses: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one ``kv`` command to completion (subprocess.run kills it on timeout)."""
    addr = ["--addr", addresses] if addresses is not None else []
    return subprocess.run(
        [*KV, *addr, *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@dataclass
class Up:
    """A running ``kv cluster up``: its process, its log, its data directory."""

    process: launcher.Process
    log: Path
    data: Path

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    @property
    def addresses(self) -> str:
        layout = json.loads((self.data / "cluster.json").read_text())
        return ",".join(node["address"] for node in layout["nodes"])

    def interrupt(self) -> str:
        """Ctrl-C; returns everything the command printed."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            launcher.kill(self.process)
            raise
        return self.output()


SIGINT_IGNORED = ["bash", "-c", 'trap "" INT; exec "$@"', "kv-up"]
"""Start a command as a script's background job does: with SIGINT ignored, inherited."""


@contextmanager
def cluster_up(data: Path, *args: str, sigint_ignored: bool = False) -> Iterator[Up]:
    """``kv cluster up`` in the background, interrupted (or killed) however the block ends.

    Its output goes to a file, never a pipe, so that waiting for the banner keeps a deadline.
    The command dies with the test runner (parent-death signal) and its nodes die with it.
    """
    log = data.parent / f"{data.name}-up-{time.monotonic_ns()}.log"
    prefix = SIGINT_IGNORED if sigint_ignored else []
    process = launcher.spawn(
        [*prefix, *KV, "cluster", "up", "--data", str(data), *args],
        log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    up = Up(process, log, data)
    try:
        launcher.wait_until(
            lambda: BANNER_END in up.output(),
            process,
            name="kv cluster up",
            deadline=time.monotonic() + UP_TIMEOUT,
            log=log,
        )
        yield up
    finally:
        if process.poll() is None:
            up.interrupt()


def test_cluster_up_cli_round_trip_and_restart(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    with cluster_up(data, "--nodes", "2") as up:
        addresses = up.addresses
        layout = json.loads((data / "cluster.json").read_text())
        assert [node["node_id"] for node in layout["nodes"]] == ["n1", "n2"]
        # Three copies by default, capped at two nodes.
        assert layout["replication_factor"] == 2
        assert "replication factor 2" in up.output()

        put = kv("put", "greeting", "hello", addresses=addresses)
        assert put.returncode == 0 and put.stdout.strip().isdigit(), put
        version = int(put.stdout)
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
    out = up.output()
    assert "stopped 2 nodes" in out

    # Same --data: the same nodes come back with their data. This time it starts with SIGINT
    # ignored, as under a script's `&`: Ctrl-C must still stop it.
    with cluster_up(data, sigint_ignored=True) as again_up:
        again = kv("get", "greeting", "--version", addresses=addresses)
        assert (again.returncode, again.stdout) == (0, f"version {version}\nhello\n")
    assert "stopped 2 nodes" in again_up.output()


def test_cli_promises_conditional_writes_versions_delete_and_env(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    with cluster_up(data, "--nodes", "1"):
        env = {
            **os.environ,
            "KV_ADDRESSES": json.loads((data / "cluster.json").read_text())["nodes"][0]["address"],
        }

        # KV_ADDRESSES stands in for --addr.
        first = kv("put", "k", "one", env=env)
        assert first.returncode == 0, first
        v1 = int(first.stdout)
        shown = kv("get", "k", "--version", env=env)
        assert (shown.returncode, shown.stdout) == (0, f"version {v1}\none\n")

        # --if-version: applies at the current version, refused (exit 1) at a stale one.
        moved = kv("put", "k", "two", "--if-version", str(v1), env=env)
        assert moved.returncode == 0, moved
        v2 = int(moved.stdout)
        assert v2 > v1
        stale = kv("put", "k", "three", "--if-version", str(v1), env=env)
        assert stale.returncode == 1
        assert stale.stdout.strip() == str(v2)
        assert f"condition failed: the key is at version {v2}" in stale.stderr
        assert kv("get", "k", env=env).stdout == "two\n"

        # delete --if-version at a stale version keeps the key; delete removes it.
        kept = kv("delete", "k", "--if-version", str(v1), env=env)
        assert kept.returncode == 1 and f"at version {v2}" in kept.stderr
        gone = kv("delete", "k", env=env)
        assert (gone.returncode, gone.stdout) == (0, "deleted\n")
        after = kv("get", "k", env=env)
        assert after.returncode == 1 and "not found" in after.stderr
        again = kv("delete", "k", env=env)
        assert (again.returncode, again.stdout) == (0, "not found\n")


def _owned_keys(addresses: str, count: int) -> dict[str, list[str]]:
    """``count`` keys grouped by the node that owns each."""
    by_node: dict[str, list[str]] = {}
    with Client(addresses) as client:
        for i in range(count):
            key = f"key-{i:03d}"
            by_node.setdefault(client.locate(key).node_id, []).append(key)
    return by_node


def _node_pids(data: Path) -> dict[str, int]:
    """The pids of the nodes kv cluster up says are running."""
    state = json.loads((data / "state.json").read_text())
    return {
        node_id: entry["process"]["pid"]
        for node_id, entry in state["nodes"].items()
        if entry["process"] is not None
    }


def _read_back(addresses: str, keys: list[str]) -> dict[str, bytes | None]:
    with Client(addresses, timeout=5.0) as client:
        return {key: client.get(key) for key in keys}


def test_cluster_up_survives_a_node_death_and_mends_it(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    with cluster_up(data, "--nodes", "3") as up:
        addresses = up.addresses
        by_node = _owned_keys(addresses, 60)
        assert sorted(by_node) == ["n1", "n2", "n3"]
        every_key = [key for keys in by_node.values() for key in keys]
        with Client(addresses) as client:
            for key in every_key:
                client.put(key, f"value-{key}")

        # A second supervisor on the same data is refused while this one runs.
        second = kv("cluster", "up", "--data", str(data))
        assert second.returncode == 2 and "already running" in second.stderr

        killed = kv("cluster", "kill", "n2", "--data", str(data))
        assert killed.returncode == 0, killed
        assert f"node n2 exited with code -9 (killed by SIGKILL); log: {data / 'n2.log'}" in (
            up.output()
        )
        assert up.process.poll() is None, "kv cluster up must outlive one node"

        # Three copies (the default): every key keeps working, n2's included.
        assert _read_back(addresses, every_key) == {k: f"value-{k}".encode() for k in every_key}

        status = kv("cluster", "status", "--data", str(data))
        assert status.returncode == 1, status
        rows = {line.split()[0]: line for line in status.stdout.splitlines()[2:]}
        assert " DOWN " in rows["n2"] and "exited with code -9" in rows["n2"]
        assert " up " in rows["n1"] and " up " in rows["n3"]

        started = kv("cluster", "start", "n2", "--data", str(data))
        assert (started.returncode, started.stdout) == (0, "node n2 is up\n"), started
        assert _read_back(addresses, by_node["n2"]) == {
            k: f"value-{k}".encode() for k in by_node["n2"]
        }

        restarted = kv("cluster", "restart", "n3", "--data", str(data))
        assert restarted.returncode == 0, restarted
        assert "node n3 exited with code 0" in up.output()
        assert _read_back(addresses, by_node["n3"])[by_node["n3"][0]] == (
            f"value-{by_node['n3'][0]}".encode()
        )
        healthy = kv("cluster", "status", "--data", str(data))
        assert healthy.returncode == 0 and healthy.stdout.count(" up ") == 3, healthy

        stopped = kv("cluster", "stop", "n1", "--data", str(data))
        assert stopped.returncode == 0
        assert (
            kv("cluster", "stop", "n1", "--data", str(data)).stdout == "node n1 is already down\n"
        )
        running = _node_pids(data)
        assert sorted(running) == ["n2", "n3"]
    # Ctrl-C stopped every node that was still running.
    assert "stopped 2 nodes" in up.output()
    assert not [pid for pid in running.values() if Path(f"/proc/{pid}").exists()]

    # With no supervisor, start is refused and a stale record is never signalled.
    refused = kv("cluster", "start", "n1", "--data", str(data))
    assert refused.returncode == 2 and "no kv cluster up is running" in refused.stderr
    bystander = launcher.spawn(
        [sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "bystander.log"
    )
    try:
        # A record left by a dead supervisor whose pid now names an unrelated process.
        state = json.loads((data / "state.json").read_text())
        state["supervisor"] = {"pid": bystander.pid, "started": 1}
        state["nodes"]["n1"]["process"] = {"pid": bystander.pid, "started": 1}
        (data / "state.json").write_text(json.dumps(state))
        stale = kv("cluster", "kill", "n1", "--data", str(data))
        assert (stale.returncode, stale.stdout) == (0, "node n1 is already down\n")
        assert bystander.poll() is None, "a stale pid was signalled"
    finally:
        launcher.kill(bystander)

    # Running kv cluster up again brings every node back with its data.
    with cluster_up(data):
        assert _read_back(addresses, every_key) == {k: f"value-{k}".encode() for k in every_key}


def test_cli_reports_an_unreachable_cluster() -> None:
    result = kv("--timeout", "1", "get", "k", addresses="127.0.0.1:1")
    assert result.returncode == 2
    assert "no node answered" in result.stderr
