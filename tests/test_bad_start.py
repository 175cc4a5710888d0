"""A node refuses bad configuration with one clear line and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import run_node_command, running_cluster
from kv_client import Client
from kv_tools.launcher import free_port


def _refused(*args: str) -> str:
    result = run_node_command(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kv-node: "), lines
    return str(lines[0])


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ("n1=127.0.0.1:7001,n1=127.0.0.1:7002", "names node id 'n1' twice"),
        ("n1=127.0.0.1:7001,n2=127.0.0.1:7001", "names address '127.0.0.1:7001' twice"),
        ("n1=127.0.0.1", "is not host:port"),
        ("n1:127.0.0.1:7001", "is not id=host:port"),
        ("n2=127.0.0.1:7002", "node id 'n1' is not in the cluster list"),
    ],
)
def test_malformed_cluster_lists(tmp_path: Path, cluster: str, message: str) -> None:
    line = _refused("--id", "n1", "--cluster", cluster, "--data-dir", str(tmp_path))
    assert message in line


def test_unknown_engine(tmp_path: Path) -> None:
    line = _refused("--id", "n1", "--listen", "127.0.0.1:7001", "--engine", "rocksdb")
    assert "unknown engine 'rocksdb'" in line


def test_unusable_data_directory(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    line = _refused(
        "--id", "n1", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(not_a_dir)
    )
    assert "cannot use data directory" in line


def test_port_in_use_and_foreign_data_dir_leave_the_running_node_alone(tmp_path: Path) -> None:
    with running_cluster(tmp_path, ["n1"]) as cluster:
        node = cluster.nodes["n1"]
        with Client(node.address) as kv:
            kv.put("precious", "data")

        # A second node on the same port is refused (so_reuseport is off).
        line = _refused("--id", "n1", "--listen", node.address, "--engine", "memory")
        assert f"cannot listen on {node.address}" in line

        # Another node id on n1's data directory is refused.
        line = _refused(
            "--id",
            "intruder",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--data-dir",
            str(node.data_dir),
        )
        assert "belongs to node 'n1', not 'intruder'" in line

        with Client(node.address) as kv:
            assert kv.get("precious") == b"data"
            status = kv.node_status(node.address)
        assert status.keys_stored == 1
