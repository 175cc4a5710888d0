"""The ``kv_replication_*`` metrics that an end-to-end run cannot reach cheaply: compaction,
snapshots sent and installed, proposals and commit timings, read from the registry of a
``NodeMetrics`` watching real replications (three in one process, as
``test_replication_cluster``), against what the scenario did.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_replication_cluster import (
    COMPACT_AFTER,
    COMPACTING,
    Cluster,
    applied_on,
    key_in,
    run,
    until,
)

from kv_node.metrics import NodeMetrics
from kv_node.replication.overview import overview
from kv_node.replication.replica import Replication
from kv_node.store import PutOp, WriteResult


def watched(replication: Replication) -> NodeMetrics:
    metrics = NodeMetrics(lambda: 0.0)
    metrics.watch_replication(replication)
    return metrics


def samples(metrics: NodeMetrics) -> dict[str, float]:
    """Unlabelled samples by name (labelled ones as name{value})."""
    text = generate_latest(metrics.registry).decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = ",".join(sample.labels.values())
            found[f"{sample.name}{{{label}}}" if label else sample.name] = sample.value
    return found


def test_compaction_and_snapshots_are_counted_where_they_happen(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        group = 0
        leader = cluster.leader_of(group)
        assert leader is not None
        leader_metrics = watched(leader)
        cycles_before = leader.runtime.stats.cycles
        proposals_before = leader.driver.stats.proposals
        behind = next(n for n in cluster.nodes.values() if n is not leader)
        name = behind.member_id
        await cluster.stop(name)
        writes = 3 * COMPACT_AFTER
        last = 0
        for i in range(writes):
            key = key_in(group, cluster, f"c{i % 7}")
            (put,) = await leader.write(group, [PutOp(key, b"%d" % i)])
            assert isinstance(put, WriteResult)
            last = put.version
        restarted = await cluster.start(name)
        restarted_metrics = watched(restarted)
        await until(applied_on([restarted], group, last), f"{name} caught up by snapshot")

        seen = samples(leader_metrics)
        # Each awaited write is its own entry, proposed by this leader.
        assert seen["kv_replication_proposals_total"] - proposals_before == writes
        assert seen["kv_replication_compactions_total"] == leader.runtime.stats.compactions > 0
        assert seen["kv_replication_snapshots_sent_total"] >= 1
        assert seen["kv_replication_snapshot_bytes_sent_total"] > 0
        # The histogram saw every cycle since it was attached, and nothing else (a commit is
        # timed in its worker thread, the cycle counted once the loop resumes: a scrape in
        # between sees one more commit).
        cycles = seen["kv_replication_cycles_total"] - cycles_before
        assert cycles > 0
        assert cycles <= seen["kv_replication_commit_duration_seconds_count"] <= cycles + 1
        # While the follower was down, the leader's dropped messages to it were counted.
        assert seen["kv_replication_messages_dropped_total{send}"] > 0
        view = overview(leader.driver)
        assert seen["kv_replication_partitions_led"] == view.led >= 1
        assert seen["kv_replication_partitions_hosted"] == len(leader.driver.groups)

        caught_up = samples(restarted_metrics)
        # Older snapshots that arrive late are ignored, so exactly one replaced the replica.
        assert caught_up["kv_replication_snapshots_installed_total"] == 1
        assert caught_up["kv_replication_snapshots_received_total"] >= 1
        assert caught_up["kv_replication_snapshots_discarded_total"] == 0
        assert caught_up["kv_replication_snapshots_sent_total"] == 0

    run(tmp_path, scenario, config=COMPACTING)
