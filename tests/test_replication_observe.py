"""What an operator sees of a replicated cluster, on real node processes (RF 3).

One cluster goes through a life that fixes every number: elected, written to a known number
of times, asked by a forwarded request that misses the leader, then a node killed and every
partition written again, then a second node killed. After each step the test compares the
metrics, node status, cluster map leaders and the ``kv`` command's output with what it did.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import Cluster, poll_until, running_cluster
from kv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from kv_client import Client
from kv_common.cluster_map import ClusterMap
from kv_common.wire import HOP_METADATA, Reason, decode_status_details

PARTITIONS = 16
REPLICATED = ["--replication-factor", "3", "--partitions", str(PARTITIONS), "--raft-tick-ms", "50"]
WRITES = 40
SETTLE_TIMEOUT = 30.0
RPC_TIMEOUT = 5.0
KV = [sys.executable, "-m", "kv_tools.cli"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=RPC_TIMEOUT) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def count(samples: Samples, name: str, **labels: str) -> float:
    """A counter's value, 0 when it has no sample with these labels yet."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@contextmanager
def cluster_stub(address: str) -> Iterator[cluster_pb2_grpc.ClusterServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield cluster_pb2_grpc.ClusterServiceStub(channel)


def status(address: str) -> cluster_pb2.GetNodeStatusResponse:
    with cluster_stub(address) as stub:
        reply: cluster_pb2.GetNodeStatusResponse = stub.GetNodeStatus(
            cluster_pb2.GetNodeStatusRequest(), timeout=RPC_TIMEOUT
        )
        return reply


def map_of(address: str, include_partitions: bool = True) -> ClusterMap:
    with cluster_stub(address) as stub:
        reply = stub.GetClusterMap(
            cluster_pb2.GetClusterMapRequest(include_partitions=include_partitions),
            timeout=RPC_TIMEOUT,
        )
    return ClusterMap.from_proto(reply.cluster_map)


def kv(addresses: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KV, "--addr", addresses, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def settled(cluster: Cluster, names: list[str]) -> bool:
    """Every partition led, as every named node sees it, by one of them."""
    statuses = [status(cluster.nodes[name].address) for name in names]
    return sum(s.partitions_led for s in statuses) == PARTITIONS and all(
        s.partitions_without_leader == 0 for s in statuses
    )


def key_in(placement_map: ClusterMap, partition: int) -> str:
    return next(
        key
        for key in (f"p{partition}-{i}" for i in range(100_000))
        if placement_map.placement.partition_of(key.encode()) == partition
    )


def test_metrics_status_leaders_and_cli_follow_what_the_cluster_did(tmp_path: Path) -> None:
    names = ["n1", "n2", "n3"]
    with running_cluster(tmp_path, names, extra=REPLICATED) as cluster:
        nodes = cluster.nodes
        addresses = ",".join(cluster.addresses)
        poll_until(lambda: settled(cluster, names), timeout=SETTLE_TIMEOUT, what="leaders")

        # Node status and the map's leaders agree with each other.
        statuses = {name: status(nodes[name].address) for name in names}
        for s in statuses.values():
            assert (s.replication_factor, s.partitions_hosted) == (3, PARTITIONS)
        seen = map_of(nodes["n1"].address)
        assert all(seen.leaders), seen.leaders
        for name in names:
            assert seen.leaders.count(name) == statuses[name].partitions_led
        # Leaders are a hint, not the map's identity: the same map as without partitions.
        assert seen == map_of(nodes["n2"].address, include_partitions=False)
        assert map_of(nodes["n2"].address, include_partitions=False).leaders == ()

        # Every write is one proposal by its partition's leader, applied on all three nodes.
        before = {name: scrape(nodes[name].metrics or "") for name in names}
        with Client(addresses, timeout=RPC_TIMEOUT) as client:
            for i in range(WRITES):
                client.put(f"key-{i}", b"v")

        def applied_everywhere() -> bool:
            return all(
                value(scrape(nodes[n].metrics or ""), "kv_replication_entries_applied_total")
                - value(before[n], "kv_replication_entries_applied_total")
                == WRITES
                for n in names
            )

        poll_until(applied_everywhere, timeout=SETTLE_TIMEOUT, what="writes applied")
        after = {name: scrape(nodes[name].metrics or "") for name in names}
        proposed = sum(
            value(after[n], "kv_replication_proposals_total")
            - value(before[n], "kv_replication_proposals_total")
            for n in names
        )
        assert proposed == WRITES
        for name in names:
            samples = after[name]
            assert value(samples, "kv_replication_partitions_hosted") == PARTITIONS
            assert value(samples, "kv_replication_partitions_led") == statuses[name].partitions_led
            assert value(samples, "kv_replication_partitions_without_leader") == 0
            awake = value(samples, "kv_replication_groups", state="awake")
            assert awake + value(samples, "kv_replication_groups", state="asleep") == PARTITIONS
            assert value(samples, "kv_replication_leader_changes_total") >= 1
            assert value(samples, "kv_replication_cycles_total") > value(
                before[name], "kv_replication_cycles_total"
            )
            # The commit is timed in its worker thread, the cycle counted once the loop
            # resumes: a scrape in between sees one more commit.
            commits = value(samples, "kv_replication_commit_duration_seconds_count")
            cycles = value(samples, "kv_replication_cycles_total")
            assert cycles <= commits <= cycles + 1
            assert value(samples, "kv_replication_messages_sent_total") > 0
            assert value(samples, "kv_replication_messages_received_total") > 0
            assert value(samples, "kv_replication_map_mismatches_total", by="us") == 0
            assert value(samples, "kv_replication_snapshots_sent_total") == 0
            assert value(samples, "kv_replication_snapshots_installed_total") == 0

        # A forwarded request that reaches a node which does not lead is refused NOT_LEADER.
        group = 0
        leader = seen.leaders[group]
        follower = next(name for name in seen.placement.replicas(group) if name != leader)
        key = key_in(seen, group)
        # The SDK's own puts above may have been refused by this node too (that is how it
        # learns leaders): count from here.
        before_refusal = count(
            scrape(nodes[follower].metrics or ""),
            "kv_refusals_total",
            method="Put",
            reason="NOT_LEADER",
        )
        with (
            grpc.insecure_channel(nodes[follower].address) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            kv_pb2_grpc.KVServiceStub(channel).Put(
                kv_pb2.PutRequest(key=key.encode(), value=b"v"),
                metadata=((HOP_METADATA, "test"),),
                timeout=RPC_TIMEOUT,
            )
        call = refused.value
        assert isinstance(call, grpc.Call)
        info = decode_status_details(tuple(call.trailing_metadata() or ()))
        assert info is not None and info.reason == Reason.NOT_LEADER
        refusals = scrape(nodes[follower].metrics or "")
        assert (
            value(refusals, "kv_refusals_total", method="Put", reason="NOT_LEADER")
            == before_refusal + 1
        )

        # kv locate names the replicas and the leader; kv cluster status the leaders per node
        # (once every follower's acknowledgement of the last write has reached its leader).
        poll_until(
            lambda: all(status(nodes[n].address).replicas_behind == 0 for n in names),
            timeout=SETTLE_TIMEOUT,
            what="followers caught up",
        )
        where = kv(addresses, "locate", key)
        assert where.returncode == 0, where
        assert f"replicas:  {', '.join(seen.placement.replicas(group))}\n" in where.stdout
        assert f"leader:    {leader} at {nodes[leader].address}" in where.stdout
        table = kv(addresses, "cluster", "status")
        assert table.returncode == 0, table
        rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[2:]}
        for name in names:
            assert rows[name][2] == "up"
            # leaders, no leader, behind: the node's own status.
            assert rows[name][-3:] == [str(statuses[name].partitions_led), "0", "0"], table
        assert f"leaders: {PARTITIONS} of {PARTITIONS} partitions led; 0 without a quorum" in (
            table.stdout
        )

        # kill -9 of one node: the others lead everything, and once every partition is
        # written again each has exactly one replica behind (the dead one's).
        nodes["n3"].kill()
        survivors = ["n1", "n2"]
        poll_until(lambda: settled(cluster, survivors), timeout=SETTLE_TIMEOUT, what="failover")
        with Client(",".join(nodes[n].address for n in survivors), timeout=RPC_TIMEOUT) as client:
            for partition in range(PARTITIONS):
                client.put(key_in(seen, partition), b"again")
        behind = sum(status(nodes[n].address).replicas_behind for n in survivors)
        assert behind == PARTITIONS
        gauges = sum(
            value(scrape(nodes[n].metrics or ""), "kv_replication_replicas_behind")
            for n in survivors
        )
        assert gauges == PARTITIONS
        down = kv(addresses, "cluster", "status")
        assert down.returncode == 1, down
        assert "n3" in down.stdout and " DOWN " in down.stdout
        assert f"leaders: {PARTITIONS} of {PARTITIONS} partitions led; 0 without a quorum" in (
            down.stdout
        )

        # With two of three down no partition has a quorum; the survivor forgets the dead
        # leaders and steps down where it led (CheckQuorum), so it knows no leader at all.
        nodes["n2"].kill()
        alone = kv(nodes["n1"].address, "cluster", "status")
        assert alone.returncode == 1, alone
        assert f"; {PARTITIONS} without a quorum of replicas up" in alone.stdout
        poll_until(
            lambda: status(nodes["n1"].address).partitions_without_leader == PARTITIONS,
            timeout=SETTLE_TIMEOUT,
            what="n1 without leaders",
        )
        last = scrape(nodes["n1"].metrics or "")
        assert value(last, "kv_replication_partitions_without_leader") == PARTITIONS
        assert value(last, "kv_replication_partitions_led") == 0
        assert map_of(nodes["n1"].address).leaders == ()
        orphan = kv(nodes["n1"].address, "locate", key)
        assert "leader:    unknown (no replica knows one)" in orphan.stdout, orphan
