"""Hostile input, disk: a node refuses a damaged or unusable data directory and touches nothing.

Each case damages a data directory that a node has used (or a fresh one),
runs a real ``kv-node`` on it, and expects exit code 2, exactly one line on
stderr saying what is wrong, and the directory byte-for-byte as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import Cluster, NodeProcess, run_node_command
from kv_client import Client
from kv_common.cluster_map import ClusterMap, Member
from kv_common.placement import DEFAULT_VNODES
from kv_node.data_dir import (
    IDENTITY_FILE,
    describe_placement,
    hosted_partitions,
    open_replica_store,
    open_store,
)
from kv_node.store import PutOp
from kv_tools.launcher import free_port

NODE_ID = "n1"
KEYS_WRITTEN = 300
"""Enough writes that data.mdb spans many pages, so a truncation cuts live data."""

Snapshot = dict[str, tuple[str, int, bytes]]


def snapshot(root: Path) -> Snapshot:
    """Every path under ``root`` (root included): kind, permission bits, content."""
    found: Snapshot = {}
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    for path in paths:
        if not os.path.lexists(path):
            continue
        info = path.lstat()
        name = str(path.relative_to(root.parent))
        if stat.S_ISLNK(info.st_mode):
            found[name] = ("link", 0, os.readlink(path).encode())
        elif stat.S_ISDIR(info.st_mode):
            found[name] = ("dir", stat.S_IMODE(info.st_mode), b"")
        else:
            found[name] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return found


def used_data_dir(root: Path) -> Path:
    """A data directory as a node leaves it after serving some writes."""
    data_dir = root / NODE_ID
    store = open_store("lmdb", data_dir, NODE_ID)
    for start in range(0, KEYS_WRITTEN, 50):
        store.write([PutOp(b"key-%d" % i, b"value-%d" % i * 20) for i in range(start, start + 50)])
    store.close()
    return data_dir


def refuse(data_dir: Path, *, watch: Path | None = None, listen: str | None = None) -> str:
    """Run a node on ``data_dir``: one line, exit 2, and ``watch`` (default: it) unchanged."""
    watched = watch or data_dir
    before = snapshot(watched)
    result = run_node_command(
        "--id",
        NODE_ID,
        "--listen",
        listen or f"127.0.0.1:{free_port()}",
        "--data-dir",
        str(data_dir),
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kv-node: "), lines
    assert snapshot(watched) == before, "a refused start changed the directory"
    return str(lines[0])


def serve_and_read_back(data_dir: Path) -> None:
    """Start a real node on ``data_dir`` and check every key ``used_data_dir`` wrote."""
    address = f"127.0.0.1:{free_port()}"
    node = NodeProcess(NODE_ID, address, data_dir, f"{NODE_ID}={address}")
    node.start()
    try:
        node.wait_ready()
        with Client(address, timeout=10.0) as kv:
            assert kv.node_status(address).keys_stored == KEYS_WRITTEN
            for i in (0, KEYS_WRITTEN // 2, KEYS_WRITTEN - 1):
                assert kv.get(b"key-%d" % i) == b"value-%d" % i * 20
        assert node.terminate() == 0, node.output()
    finally:
        node.kill()


def test_the_undamaged_directory_starts_and_serves_its_data(tmp_path: Path) -> None:
    """The control for every refusal below: the same directory, undamaged, is served."""
    serve_and_read_back(used_data_dir(tmp_path))


def test_a_garbage_lock_file_is_rebuilt_not_refused(tmp_path: Path) -> None:
    """lock.mdb holds only reader slots, which LMDB resets when the first process opens it."""
    data_dir = used_data_dir(tmp_path)
    lock = data_dir / "lmdb" / "lock.mdb"
    lock.write_bytes(os.urandom(lock.stat().st_size))
    serve_and_read_back(data_dir)


def _truncate_to_half(data_dir: Path) -> None:
    data = data_dir / "lmdb" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)


def _garbage(data_dir: Path) -> None:
    data = data_dir / "lmdb" / "data.mdb"
    data.write_bytes(os.urandom(data.stat().st_size))


def _swap_in_another_store(data_dir: Path) -> None:
    other = used_data_dir(data_dir.parent / "other")
    shutil.copyfile(other / "lmdb" / "data.mdb", data_dir / "lmdb" / "data.mdb")
    shutil.rmtree(other.parent)


def _replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _replace_with_file(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("not a directory")


STORE_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "data.mdb removed": (lambda d: (d / "lmdb" / "data.mdb").unlink(), "data.mdb is missing"),
    "lmdb/ removed": (lambda d: shutil.rmtree(d / "lmdb"), "data.mdb is missing"),
    "data.mdb emptied": (lambda d: os.truncate(d / "lmdb" / "data.mdb", 0), "is empty"),
    "data.mdb truncated to half": (_truncate_to_half, "is truncated"),
    "data.mdb truncated into its meta pages": (
        lambda d: os.truncate(d / "lmdb" / "data.mdb", 100),
        "is truncated",
    ),
    "data.mdb full of garbage": (_garbage, "is not an LMDB data file"),
    "data.mdb from another store": (_swap_in_another_store, "is not the one kv-node.json records"),
    "data.mdb is a directory": (
        lambda d: _replace_with_dir(d / "lmdb" / "data.mdb"),
        "is not a regular file",
    ),
    "lock.mdb is a directory": (
        lambda d: _replace_with_dir(d / "lmdb" / "lock.mdb"),
        "is not a regular file",
    ),
    "lmdb/ is a file": (lambda d: _replace_with_file(d / "lmdb"), "lmdb is not a directory"),
    "identity removed from a store with data": (
        lambda d: (d / IDENTITY_FILE).unlink(),
        "has no kv-node.json",
    ),
}


@pytest.mark.parametrize("case", sorted(STORE_DAMAGE))
def test_a_damaged_store_is_refused(tmp_path: Path, case: str) -> None:
    data_dir = used_data_dir(tmp_path)
    damage, message = STORE_DAMAGE[case]
    damage(data_dir)
    assert message in refuse(data_dir)


IDENTITY_SHAPES: dict[str, bytes] = {
    "empty": b"",
    "not UTF-8": b"\xff\xfe\x00garbage",
    "not JSON": b"node_id=n1",
    "a JSON list": b'["n1"]',
    "a JSON string": b'"n1"',
    "JSON null": b"null",
    "an empty object": b"{}",
    "node_id a number": b'{"node_id": 1, "format": 2}',
    "node_id empty": b'{"node_id": "", "format": 2}',
    "format missing": b'{"node_id": "n1"}',
    "format unknown": b'{"node_id": "n1", "format": 99}',
    "format a boolean": b'{"node_id": "n1", "format": true}',
    "format a string": b'{"node_id": "n1", "format": "2"}',
    "an unknown field": b'{"node_id": "n1", "format": 2, "owner": "n1"}',
    "store id malformed": b'{"node_id": "n1", "format": 2, "lmdb_store_id": "../../etc"}',
    "store id in format 1": b'{"node_id": "n1", "format": 1, "lmdb_store_id": "'
    + b"a" * 32
    + b'"}',
}


@pytest.mark.parametrize("shape", sorted(IDENTITY_SHAPES))
def test_an_identity_file_of_the_wrong_shape_is_refused(tmp_path: Path, shape: str) -> None:
    data_dir = used_data_dir(tmp_path)
    (data_dir / IDENTITY_FILE).write_bytes(IDENTITY_SHAPES[shape])
    assert "is not a kv-node identity" in refuse(data_dir)


def test_an_identity_file_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    _replace_with_dir(data_dir / IDENTITY_FILE)
    assert "cannot read identity file" in refuse(data_dir)


def test_a_dangling_identity_symlink_is_refused(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    (data_dir / IDENTITY_FILE).unlink()
    (data_dir / IDENTITY_FILE).symlink_to(tmp_path / "nowhere.json")
    assert "cannot read identity file" in refuse(data_dir)


def test_another_nodes_identity_is_refused(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    (data_dir / IDENTITY_FILE).write_text(json.dumps({"node_id": "n2", "format": 2}))
    assert "belongs to node 'n2', not 'n1'" in refuse(data_dir)


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert "is not a directory" in refuse(not_a_dir, watch=tmp_path)


def test_a_data_dir_under_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert f"{blocker} is not a directory" in refuse(blocker / "sub" / "n1", watch=tmp_path)


@contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable, even for root (which ignores permission bits)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield
        finally:
            path.chmod(mode)
        return
    # Root: the immutable attribute binds root too.
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make {path} unwritable for root here: {made.stderr!r}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_unwritable_fresh_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "n1"
    data_dir.mkdir()
    with unwritable(data_dir):
        assert "is not writable" in refuse(data_dir)
    assert list(data_dir.iterdir()) == []


def test_an_unwritable_used_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    with unwritable(data_dir / "lmdb"):
        assert "lmdb is not writable" in refuse(data_dir)


def test_an_unwritable_data_file_is_refused(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    with unwritable(data_dir / "lmdb" / "data.mdb"):
        assert "data.mdb is not readable and writable" in refuse(data_dir)


def test_a_data_dir_in_use_by_a_running_node_is_refused(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, [NODE_ID])
    try:
        cluster.start()
        node = cluster.nodes[NODE_ID]
        # Not compared byte for byte: the running node owns the files and may write them.
        result = run_node_command(
            "--id",
            NODE_ID,
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--data-dir",
            str(node.data_dir),
        )
        assert result.returncode == 2, result
        assert result.stderr.strip().splitlines() == [
            f"kv-node: {node.data_dir / 'lmdb'} is in use by another process"
        ]
        assert node.process is not None and node.process.poll() is None
    finally:
        cluster.stop()


@contextmanager
def occupied_port() -> Iterator[str]:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        host, port = holder.getsockname()
        yield f"{host}:{port}"


def test_a_failed_start_leaves_no_fresh_data_dir_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "n1"
    with occupied_port() as address:
        line = refuse(data_dir, watch=tmp_path, listen=address)
    assert "cannot listen on" in line
    assert not (tmp_path / "new").exists()


def test_a_failed_start_empties_the_fresh_data_dir_it_was_given(tmp_path: Path) -> None:
    data_dir = tmp_path / "n1"
    data_dir.mkdir()
    with occupied_port() as address:
        assert "cannot listen on" in refuse(data_dir, listen=address)
    assert list(data_dir.iterdir()) == []


def test_a_replica_directory_started_with_another_partition_count_is_refused(
    tmp_path: Path,
) -> None:
    """The default partition count changed once (4096 to 1024): a replicated node started on
    its old directory with the new default would serve other partitions' groups; it refuses."""
    members = tuple(Member(f"n{i}", f"127.0.0.1:{free_port()}") for i in (1, 2, 3))
    created = ClusterMap.build(
        epoch=1, members=members, partitions=16, replication_factor=3, vnodes=DEFAULT_VNODES
    )
    data_dir = tmp_path / "n1"
    open_replica_store(
        data_dir,
        "n1",
        map_size=1 << 24,
        placement=describe_placement(created),
        hosted=hosted_partitions(created, "n1"),
    ).close()
    before = snapshot(data_dir)
    refused = run_node_command(
        "--id", "n1", "--cluster", ",".join(f"{m.node_id}={m.address}" for m in members),
        "--data-dir", str(data_dir), "--partitions", "32",
    )  # fmt: skip
    assert refused.returncode == 2, refused
    assert "holds replicas for members n1,n2,n3; 16 partitions" in refused.stderr, refused
    assert "is started with members n1,n2,n3; 32 partitions" in refused.stderr, refused
    assert snapshot(data_dir) == before
