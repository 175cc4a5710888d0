from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kv_node.config import ConfigError, NodeConfig, build_config, parse_cluster
from kv_node.main import config_from_args, parser

CLUSTER = "a=127.0.0.1:7001,b=127.0.0.1:7002,c=127.0.0.1:7003"


def config(*argv: str) -> NodeConfig:
    return config_from_args(parser().parse_args(list(argv)))


def test_listen_and_advertise_default_to_the_cluster_entry(tmp_path: Path) -> None:
    cfg = config("--id", "b", "--cluster", CLUSTER, "--data-dir", str(tmp_path))
    assert (cfg.listen, cfg.advertise) == ("127.0.0.1:7002", "127.0.0.1:7002")
    assert [m.node_id for m in cfg.cluster.members] == ["a", "b", "c"]
    assert cfg.cluster.epoch == 1


def test_single_node_without_cluster_list() -> None:
    cfg = config("--id", "solo", "--listen", "127.0.0.1:7009", "--engine", "memory")
    assert [m.address for m in cfg.cluster.members] == ["127.0.0.1:7009"]


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
        "listen": None,
        "advertise": None,
        "cluster": CLUSTER,
        "engine": "memory",
        "data_dir": None,
        "metrics_listen": None,
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
    return build_config(**settings)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"node_id": "z"}, "node id 'z' is not in the cluster list"),
        ({"node_id": "bad id!"}, "must be 1-64 characters"),
        ({"advertise": "127.0.0.1:9999"}, "but it advertises"),
        ({"partitions": 100}, "power of two"),
        ({"max_value_bytes": 0}, "--max-value-bytes must be at least 1"),
        ({"forward_timeout": 0}, "--forward-timeout must be positive"),
        ({"engine": "lmdb"}, "the lmdb engine needs --data-dir"),
        ({"metrics_listen": "nonsense"}, "metrics address"),
        ({"cluster": None, "listen": None}, "give --listen"),
    ],
)
def test_bad_settings_are_refused_with_one_clear_line(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _build(**overrides)
    assert "\n" not in str(info.value)


def test_message_ceiling_fits_the_largest_request() -> None:
    cfg = _build(max_value_bytes=2_000_000, max_batch_bytes=100)
    assert cfg.max_message_bytes > 2_000_000 + 4096
