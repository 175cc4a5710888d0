"""A data directory knows which node it belongs to and which store it holds.

Starting node B on node A's directory would serve A's keys under B's name and
corrupt placement silently, so the first start writes an identity file and
every later start checks it. The identity also records the id of the LMDB
store created there: a later start that finds the store missing, emptied,
truncated or replaced refuses instead of serving an empty store from revision
0 (which would lose every write and hand out old versions again).

Every check runs before anything is written, so a refused start leaves the
directory exactly as it was; and ``discard_if_not_started`` removes what a
start created in a fresh directory if the start fails after all.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from kv_common.cluster_map import ClusterMap
from kv_node.replication.storage import ReplicaStore
from kv_node.store import Store, StoreError
from kv_node.store.lmdb_file import DATA_FILE
from kv_node.store.lmdb_store import DEFAULT_MAP_SIZE, LmdbStore, inspect
from kv_node.store.memory import MemoryStore

IDENTITY_FILE = "kv-node.json"
LMDB_DIR = "lmdb"
REPLICA_DIR = "replicas"
"""Where a replicated node (``--replication-factor`` above 1) keeps its replica store."""
IDENTITY_FORMAT = 2
"""1: node id only. 2: adds ``lmdb_store_id`` once an LMDB store exists, or
``replica_store_id`` once a replica store exists (never both); with either, the
``placement`` the store serves (``describe_placement``), absent from directories created
before it was recorded (such a directory is trusted once, then records it)."""
_KNOWN_FORMATS = (1, 2)
_STORE_ID_HEX_DIGITS = 32
ENGINES = ("lmdb", "memory")
"""The storage engines; the name is checked here, where the engine is opened."""


class Identity(NamedTuple):
    node_id: str
    format: int
    lmdb_store_id: str | None = None
    replica_store_id: str | None = None
    placement: str | None = None


def describe_placement(cluster_map: ClusterMap) -> str:
    """What decides which partitions' groups a replica store holds: the member ids, the
    partition count, the ring points per node and the replication factor (not the addresses,
    which a node may change without moving a partition)."""
    members = ",".join(sorted(m.node_id for m in cluster_map.members))
    return (
        f"members {members}; {cluster_map.partitions} partitions; {cluster_map.vnodes} vnodes; "
        f"replication factor {cluster_map.replication_factor}"
    )


def read_identity(data_dir: Path) -> Identity | None:
    """The identity recorded in ``data_dir``, or None if it has none yet."""
    path = data_dir / IDENTITY_FILE
    if not os.path.lexists(path):
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read identity file {path}: {exc.strerror or exc}") from exc
    try:
        document = json.loads(raw)
        problem = _shape_problem(document)
    except ValueError:  # also bytes that are not UTF-8
        problem = "not JSON"
    if problem is not None:
        raise StoreError(
            f"identity file {path} is not a kv-node identity ({problem}); "
            "refusing to guess whose data this is"
        )
    return Identity(
        node_id=document["node_id"],
        format=document["format"],
        lmdb_store_id=document.get("lmdb_store_id"),
        replica_store_id=document.get("replica_store_id"),
        placement=document.get("placement"),
    )


def _shape_problem(document: object) -> str | None:
    if not isinstance(document, dict):
        return "not a JSON object"
    unknown = set(document) - set(Identity._fields)
    if unknown:
        return f"unknown field {sorted(unknown)[0]!r}"
    node_id = document.get("node_id")
    if not isinstance(node_id, str) or not node_id:
        return "node_id is not a non-empty string"
    version = document.get("format")
    if type(version) is not int or version not in _KNOWN_FORMATS:
        return "format is not one of " + ", ".join(map(str, _KNOWN_FORMATS))
    for name in ("lmdb_store_id", "replica_store_id"):
        store_id = document.get(name)
        if store_id is not None and (
            version < 2
            or not isinstance(store_id, str)
            or len(store_id) != _STORE_ID_HEX_DIGITS
            or any(c not in "0123456789abcdef" for c in store_id)
        ):
            return f"{name} is not a store id"
    if document.get("lmdb_store_id") is not None and document.get("replica_store_id") is not None:
        return "it records both a single-copy and a replica store"
    placement = document.get("placement")
    if placement is not None and (
        not isinstance(placement, str)
        or (document.get("replica_store_id") is None and document.get("lmdb_store_id") is None)
    ):
        return "placement is not a description of a store's placement"
    return None


def _write_identity(data_dir: Path, identity: Identity) -> None:
    document: dict[str, object] = {"node_id": identity.node_id, "format": identity.format}
    if identity.lmdb_store_id is not None:
        document["lmdb_store_id"] = identity.lmdb_store_id
    if identity.replica_store_id is not None:
        document["replica_store_id"] = identity.replica_store_id
    if identity.placement is not None:
        document["placement"] = identity.placement
    try:
        tmp = data_dir / (IDENTITY_FILE + ".tmp")
        with tmp.open("w") as f:
            json.dump(document, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(data_dir / IDENTITY_FILE)
        dir_fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StoreError(
            f"cannot write identity file in {data_dir}: {exc.strerror or exc}"
        ) from exc


def _check_usable(data_dir: Path) -> None:
    """Refuse a data directory that is not a writable directory, or cannot be created."""
    existing = data_dir
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StoreError(f"cannot use data directory {data_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"cannot use data directory {data_dir}: {existing} is not writable")


def claim(data_dir: Path, node_id: str) -> Identity:
    """Create ``data_dir`` for ``node_id``, or check that it already belongs to it."""
    _check_usable(data_dir)
    identity = read_identity(data_dir)
    if identity is not None:
        if identity.node_id != node_id:
            raise StoreError(
                f"data directory {data_dir} belongs to node {identity.node_id!r}, not {node_id!r}"
            )
        return identity
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot use data directory {data_dir}: {exc.strerror or exc}") from exc
    identity = Identity(node_id, IDENTITY_FORMAT)
    _write_identity(data_dir, identity)
    return identity


def open_store(
    engine: str,
    data_dir: Path | None,
    node_id: str,
    *,
    map_size: int = DEFAULT_MAP_SIZE,
    placement: str | None = None,
) -> Store:
    """The single-copy store. With ``placement`` (``describe_placement``), an LMDB store
    records it and refuses to start under another: its keys are the ones the placement gave
    this node, and another would send their requests elsewhere (there is no migration)."""
    if engine not in ENGINES:
        raise StoreError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if data_dir is None:
        if engine == "memory":
            return MemoryStore()
        raise StoreError("the lmdb engine needs --data-dir")
    with discard_if_not_started(data_dir) as started:
        if engine == "memory":
            claim(data_dir, node_id)
            started()
            return MemoryStore()
        store = _open_lmdb(data_dir, node_id, map_size, placement)
        started()
        return store


def _identity_for(data_dir: Path, node_id: str, *, replicated: bool) -> Identity | None:
    """The directory's identity, read-only, if it may serve ``node_id`` with this kind of store:
    not another node's, and not holding the other kind (there is no migration between them)."""
    _check_usable(data_dir)
    identity = read_identity(data_dir)
    if identity is None:
        return None
    if identity.node_id != node_id:
        raise StoreError(
            f"data directory {data_dir} belongs to node {identity.node_id!r}, not {node_id!r}"
        )
    other = identity.lmdb_store_id if replicated else identity.replica_store_id
    if other is not None:
        held, needed = ("a single-copy", "above 1") if replicated else ("a replica", "of 1")
        raise StoreError(
            f"data directory {data_dir} holds {held} store; --replication-factor {needed} "
            "needs a directory of its own (there is no migration yet)"
        )
    return identity


def _open_lmdb(data_dir: Path, node_id: str, map_size: int, placement: str | None) -> LmdbStore:
    """Check everything read-only, then claim the directory and open the store."""
    identity = _identity_for(data_dir, node_id, replicated=False)
    if placement is not None and identity is not None:
        _check_placement(data_dir, identity, placement, what="keys")
    lmdb_dir = data_dir / LMDB_DIR
    info = inspect(lmdb_dir)
    if identity is not None and identity.lmdb_store_id is not None:
        if info is None:
            raise StoreError(
                f"{lmdb_dir / DATA_FILE} is missing, but {IDENTITY_FILE} records a store there; "
                "refusing to start empty"
            )
        if info.store_id != identity.lmdb_store_id:
            raise StoreError(
                f"the LMDB store in {lmdb_dir} is not the one {IDENTITY_FILE} records "
                f"({info.store_id} instead of {identity.lmdb_store_id})"
            )
    elif identity is not None and identity.format == 1 and info is None and lmdb_dir.exists():
        # Format 1 recorded no store id, but its nodes created lmdb/ with data.mdb in it at once.
        raise StoreError(
            f"{lmdb_dir / DATA_FILE} is missing from a store created there; refusing to start empty"
        )
    elif identity is None and info is not None and info.revision > 0:
        raise StoreError(
            f"{lmdb_dir} holds data but {data_dir} has no {IDENTITY_FILE}; "
            "refusing to guess which node it belongs to"
        )
    claimed = identity or claim(data_dir, node_id)
    store = LmdbStore(lmdb_dir, map_size=map_size)
    recorded = claimed.placement if placement is None else placement
    if claimed.lmdb_store_id != store.store_id or claimed.placement != recorded:
        try:
            _write_identity(
                data_dir, Identity(node_id, IDENTITY_FORMAT, store.store_id, placement=recorded)
            )
        except StoreError:
            store.close()
            raise
    return store


def _check_placement(data_dir: Path, identity: Identity, placement: str, *, what: str) -> None:
    if identity.placement not in (None, placement):
        raise StoreError(
            f"data directory {data_dir} holds {what} for {identity.placement}; this node "
            f"is started with {placement}. Start it with the settings it was created with "
            "(there is no re-partitioning yet)"
        )


def hosted_partitions(cluster_map: ClusterMap, node_id: str) -> frozenset[int]:
    """The partitions whose replica sets include ``node_id``: the groups its store may hold."""
    return frozenset(cluster_map.placement.partitions_by_node().get(node_id, ()))


def open_replica_store(
    data_dir: Path, node_id: str, *, map_size: int, placement: str, hosted: Collection[int]
) -> ReplicaStore:
    """The replica store of a replicated node, with the same checks as the single-copy one.

    A replica that lost its store and came back empty under its old name could vote a second
    time in a term it already voted in, and elect two leaders: so a directory whose identity
    records a replica store that is now missing or replaced is refused, never started empty.
    And the store's groups are partitions of one placement (``describe_placement``): started
    with another (say a new default ``--partitions``), its groups would be other partitions'
    with other replicas, so that is refused too, before anything is opened. A store from before
    the placement was recorded must hold no group outside ``hosted`` (the partitions this
    placement gives the node) before it is trusted and the placement recorded.
    """
    identity = _identity_for(data_dir, node_id, replicated=True)
    if identity is not None:
        _check_placement(data_dir, identity, placement, what="replicas")
    replica_dir = data_dir / REPLICA_DIR
    recorded = identity.replica_store_id if identity is not None else None
    if recorded is not None and not (replica_dir / DATA_FILE).exists():
        raise StoreError(
            f"{replica_dir / DATA_FILE} is missing, but {IDENTITY_FILE} records a replica store "
            "there; refusing to start empty (a replica that forgot its votes could elect two "
            "leaders)"
        )
    if identity is None and (replica_dir / DATA_FILE).exists():
        raise StoreError(
            f"{replica_dir} holds a replica store but {data_dir} has no {IDENTITY_FILE}; "
            "refusing to guess which node it belongs to"
        )
    if identity is None:
        claim(data_dir, node_id)
    store = ReplicaStore.open(replica_dir, map_size=map_size)
    try:
        if recorded is not None and recorded != store.store_id:
            raise StoreError(
                f"the replica store in {replica_dir} is not the one {IDENTITY_FILE} records "
                f"({store.store_id} instead of {recorded})"
            )
        stray = sorted(set(store.groups()) - set(hosted))
        if stray:
            raise StoreError(
                f"the replica store in {replica_dir} holds partition {stray[-1]}'s group, which "
                f"{placement} does not give node {node_id!r}: it was created with other "
                "settings; start it with those (there is no re-partitioning yet)"
            )
        if recorded is None or identity is None or identity.placement is None:
            _write_identity(
                data_dir,
                Identity(
                    node_id, IDENTITY_FORMAT, replica_store_id=store.store_id, placement=placement
                ),
            )
    except BaseException:
        store.close()
        raise
    return store


@contextmanager
def discard_if_not_started(data_dir: Path | None) -> Iterator[Callable[[], None]]:
    """Undo what a failed start created: a fresh data directory, or new entries in it.

    The body calls the yielded function once the node is started; an exception
    before that removes the directory (and missing parents) if it did not
    exist, or else whatever appeared in it. Entries that were there before
    are never removed.
    """
    started = False

    def mark_started() -> None:
        nonlocal started
        started = True

    if data_dir is None:
        yield mark_started
        return
    created_root: Path | None = None
    probe = data_dir.absolute()
    while not os.path.lexists(probe) and probe != probe.parent:
        created_root, probe = probe, probe.parent
    before: set[str] | None = None
    if created_root is None:
        try:
            before = set(os.listdir(data_dir))
        except OSError:
            before = None  # not a readable directory: the start cannot create anything in it
    try:
        yield mark_started
    except BaseException:
        if not started:
            _discard(data_dir, created_root, before)
        raise


def _discard(data_dir: Path, created_root: Path | None, before: set[str] | None) -> None:
    if created_root is not None:
        shutil.rmtree(created_root, ignore_errors=True)
        return
    if before is None:
        return
    try:
        new = set(os.listdir(data_dir)) - before
    except OSError:
        return
    for name in new:
        entry = data_dir / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
