from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest

import kv_node.main
from kv_node.config import ConfigError, NodeConfig, parse_cluster
from kv_node.main import EXIT_CONFIG, config_from_args, main, parser
from kv_node.replication.runtime import DEFAULT_KEEP_AFTER_COMPACT
from kv_node.testing import free_port

CLUSTER = "a=127.0.0.1:7001,b=127.0.0.1:7002,c=127.0.0.1:7003"


def config(*argv: str) -> NodeConfig:
    return config_from_args(parser().parse_args(list(argv)))


def test_listen_and_advertise_default_to_the_cluster_entry(tmp_path: Path) -> None:
    cfg = config("--id", "b", "--cluster", CLUSTER, "--data-dir", str(tmp_path))
    assert (cfg.listen, cfg.advertise) == ("127.0.0.1:7002", "127.0.0.1:7002")
    assert [m.node_id for m in cfg.cluster_map.members] == ["a", "b", "c"]
    assert cfg.cluster_map.epoch == 1


def test_single_node_without_cluster_list() -> None:
    cfg = config("--id", "solo", "--listen", "127.0.0.1:7009", "--engine", "memory")
    assert [m.address for m in cfg.cluster_map.members] == ["127.0.0.1:7009"]


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ("a=127.0.0.1:7001,a=127.0.0.1:7002", "names node id 'a' twice"),
        ("a=127.0.0.1:7001,b=127.0.0.1:7001", "names address '127.0.0.1:7001' twice"),
        ("a=127.0.0.1", "is not host:port"),
        ("a127.0.0.1:7001", "is not id=host:port"),
        ("a=127.0.0.1:99999", "outside 1..65535"),
        ("a=host:port", "is not host:port"),
        ("=127.0.0.1:7001", "node id ''"),
        (",,", "the cluster list is empty"),
    ],
)
def test_malformed_cluster_lists_are_refused(cluster: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_cluster(cluster)


def _build(**overrides: Any) -> NodeConfig:
    settings: dict[str, Any] = {
        "node_id": "a",
        "cluster": CLUSTER,
        "engine": "memory",
        "replication_factor": 1,
        "max_value_bytes": 1024,
        "max_batch_ops": 10,
        "max_batch_bytes": 4096,
        "partitions": 64,
        "vnodes": 16,
        "forward_timeout": 1.0,
        "drain_seconds": 1.0,
        "lmdb_map_size": 1 << 20,
    }
    settings.update(overrides)
    return NodeConfig(**settings)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"node_id": "z"}, "node id 'z' is not in the cluster list"),
        ({"node_id": "bad id!"}, "must be 1-64 characters"),
        ({"node_id": ""}, "must be 1-64 characters"),
        ({"advertise": "127.0.0.1:9999"}, "but it advertises"),
        ({"partitions": 100}, "power of two"),
        ({"max_value_bytes": 0}, "--max-value-bytes must be between 1 and"),
        ({"max_value_bytes": 10_000_000_000}, "--max-value-bytes must be between 1 and"),
        ({"max_batch_bytes": 2**31}, "--max-batch-bytes must be between 1 and"),
        ({"max_batch_ops": -1}, "--max-batch-ops must be between 1 and"),
        ({"vnodes": 0}, "--vnodes must be between 1 and"),
        ({"vnodes": 10**9}, "--vnodes must be between 1 and"),
        ({"lmdb_map_size": -1}, "--lmdb-map-size must be between"),
        ({"lmdb_map_size": 1}, "--lmdb-map-size must be between"),
        ({"max_in_flight": 0}, "--max-in-flight must be between"),
        ({"replication_factor": 0}, "--replication-factor must be between 1 and"),
        ({"replication_factor": 8}, "--replication-factor must be between 1 and"),
        ({"raft_tick_ms": 5}, "--raft-tick-ms must be between"),
        ({"raft_compact_after": 9}, "--raft-compact-after must be between 10 and"),
        ({"replication_factor": 3}, "--replication-factor 3 needs the lmdb engine"),
        ({"peer_via": "a=127.0.0.1:9"}, "--peer-via names 'a', which is not a peer"),
        ({"peer_via": "zz=127.0.0.1:9"}, "--peer-via names 'zz', which is not a peer"),
        ({"peer_via": "b=nonsense"}, "is not host:port"),
        ({"forward_timeout": 0}, "--forward-timeout must be more than 0"),
        ({"forward_timeout": float("nan")}, "--forward-timeout must be more than 0"),
        ({"forward_timeout": float("inf")}, "--forward-timeout must be more than 0"),
        ({"drain_seconds": -1}, "--drain-seconds must be at least 0"),
        ({"drain_seconds": float("nan")}, "--drain-seconds must be at least 0"),
        ({"cluster": ""}, "the cluster list is empty"),
        ({"engine": "lmdb"}, "the lmdb engine needs --data-dir"),
        ({"metrics_listen": "nonsense"}, "metrics address"),
        ({"cluster": None, "listen": None}, "give --listen"),
        ({"cluster": None, "listen": ""}, "is not host:port"),
    ],
)
def test_bad_settings_are_refused_with_one_clear_line(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _build(**overrides)
    assert "\n" not in str(info.value)


def test_every_field_is_a_flag_with_its_default() -> None:
    """The parser is derived from the dataclass: each field's default is the flag's."""
    args = parser().parse_args(["--id", "a", "--engine", "memory", "--listen", "h:1"])
    defaults = {f.name: f.default for f in dataclasses.fields(NodeConfig) if f.init}
    assert set(vars(args)) == set(defaults)
    for name, default in defaults.items():
        if name not in ("node_id", "engine", "listen"):
            assert getattr(args, name) == default, name


def test_the_replication_factor_is_capped_at_the_member_count(tmp_path: Path) -> None:
    durable = {"engine": "lmdb", "data_dir": tmp_path}
    assert _build(replication_factor=5, **durable).cluster_map.replication_factor == len(
        _build().cluster_map.members
    )
    assert not _build().replicated
    assert _build(replication_factor=2, **durable).replicated


def test_three_copies_by_default_and_one_node_alone_keeps_one(tmp_path: Path) -> None:
    cluster = config("--id", "a", "--cluster", CLUSTER, "--data-dir", str(tmp_path))
    assert cluster.cluster_map.replication_factor == 3
    assert cluster.replicated
    solo = config("--id", "solo", "--listen", "127.0.0.1:7009", "--engine", "memory")
    assert solo.cluster_map.replication_factor == 1


def test_the_memory_engine_in_a_cluster_says_to_ask_for_one_copy() -> None:
    with pytest.raises(ConfigError, match="give --replication-factor 1"):
        config("--id", "a", "--cluster", CLUSTER, "--engine", "memory")
    one_copy = config(
        "--id", "a", "--cluster", CLUSTER, "--engine", "memory", "--replication-factor", "1"
    )
    assert not one_copy.replicated


def test_peer_via_names_where_to_dial_a_peer() -> None:
    assert _build(peer_via="b=127.0.0.1:9").peer_dial == {"b": "127.0.0.1:9"}


def test_a_lower_compaction_bound_keeps_half_of_it_after_compacting() -> None:
    assert _build().raft_keep_after_compact == DEFAULT_KEEP_AFTER_COMPACT
    assert _build(raft_compact_after=60).raft_keep_after_compact == 30
    assert _build(raft_compact_after=10).raft_keep_after_compact == 5


def test_published_limits_are_the_configured_ones() -> None:
    cfg = _build(max_value_bytes=77, max_batch_ops=5, max_batch_bytes=999)
    limits = cfg.cluster_map.limits
    assert (limits.max_value_bytes, limits.max_batch_ops, limits.max_batch_bytes) == (77, 5, 999)


def test_message_ceiling_fits_the_largest_request() -> None:
    cfg = _build(max_value_bytes=2_000_000, max_batch_bytes=100)
    assert cfg.max_message_bytes > 2_000_000 + 4096


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-value-bytes", "10000000000"], "--max-value-bytes must be between"),
        (["--lmdb-map-size", "-1"], "--lmdb-map-size must be between"),
        (["--lmdb-map-size", "1"], "--lmdb-map-size must be between"),
        (["--forward-timeout", "nan"], "--forward-timeout must be more than 0"),
        (["--drain-seconds", "-1"], "--drain-seconds must be at least 0"),
        (["--cluster", ""], "the cluster list is empty"),
        (["--max-batch-ops", "many"], "argument --max-batch-ops: invalid int value"),
        (["--data-dir", ""], "argument --data-dir: invalid"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_nonsense_flags_exit_2_with_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = tmp_path / "fresh"
    base = ["--id", "a", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(fresh)]
    code: int | str | None
    try:
        code = main([*base, *argv])
    except SystemExit as exit_:
        code = exit_.code  # argparse's own refusals
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG, err
    assert err.count("\n") == 1 and err.startswith("kv-node: "), err
    assert message in err
    assert not fresh.exists(), "a refused start left files behind"


def test_a_failed_start_leaves_a_fresh_data_dir_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever fails after the store was opened, a fresh directory is removed again."""

    async def fails(config: NodeConfig, store: object, *, ready: object = None) -> None:
        raise ConfigError("cannot listen on 127.0.0.1:1: it was taken meanwhile")

    monkeypatch.setattr(kv_node.main, "serve", fails)
    absent = tmp_path / "new" / "deeper"
    empty = tmp_path / "empty"
    empty.mkdir()
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("operator's file")
    for data_dir in (absent, empty, used):
        port = free_port()
        code = main(["--id", "a", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)])
        assert code == EXIT_CONFIG
        assert "taken meanwhile" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert empty.is_dir() and list(empty.iterdir()) == []
    assert (used / "keep.txt").read_text() == "operator's file"
    assert sorted(p.name for p in used.iterdir()) == ["keep.txt"], "only what the start made goes"


def test_port_in_use_is_refused_before_the_data_dir_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = tmp_path / "fresh"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        assert main(["--id", "a", "--listen", address, "--data-dir", str(fresh)]) == EXIT_CONFIG
    assert f"cannot listen on {address}" in capsys.readouterr().err
    assert not fresh.exists()
