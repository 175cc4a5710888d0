"""The chaos verdict on synthetic histories: planted lost writes and stale reads are caught,
unknown outcomes are allowed both ways, failed ones are not allowed to have happened."""

from __future__ import annotations

import grpc
import pytest
from chaos.check import judge, lost_writes, to_ops
from chaos.history import Outcome, Record, outcome_of

from kv_client import (
    DeadlineExceededError,
    KvError,
    NotLeaderError,
    OverloadedError,
    StaleMapError,
    UnavailableError,
)
from kv_common.wire import Reason

pytestmark = pytest.mark.chaos

FINAL = 99
TICK = 1000  # ns: the checker sees microseconds


class Builder:
    """Records on a made-up clock; each op's times are given in ticks."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def _add(self, record: Record) -> None:
        self.records.append(record)

    def put(
        self, key: str, value: str, call: int, ret: int, version: int, outcome: Outcome = "ok"
    ) -> None:
        known = outcome in ("ok", "failed")
        self._add(
            Record(
                len(self.records), 1, "put", key, call * TICK, value=value,
                ret=ret * TICK if known else None, outcome=outcome,
                version=version if outcome == "ok" else None,
            )
        )  # fmt: skip

    def cas(
        self,
        key: str,
        expected: str | None,
        value: str,
        call: int,
        ret: int,
        *,
        succeeded: bool,
        version: int,
    ) -> None:
        self._add(
            Record(
                len(self.records), 2, "cas", key, call * TICK, value=value, expected=expected,
                ret=ret * TICK, outcome="ok", succeeded=succeeded, version=version,
            )
        )  # fmt: skip

    def get(
        self, key: str, read: str | None, call: int, ret: int, version: int, client: int = 3
    ) -> None:
        self._add(
            Record(
                len(self.records), client, "get", key, call * TICK, ret=ret * TICK, outcome="ok",
                read=read, version=version if read is not None else None,
            )
        )  # fmt: skip


def base() -> Builder:
    h = Builder()
    h.put("a", "v1", 1, 2, version=10)
    h.put("a", "v2", 3, 4, version=11)
    h.cas("a", "v2", "v3", 5, 6, succeeded=True, version=12)
    h.cas("a", "v2", "v4", 7, 8, succeeded=False, version=12)
    h.get("a", "v3", 9, 10, version=12)
    return h


def test_a_correct_history_passes() -> None:
    h = base()
    h.get("a", "v3", 20, 21, version=12, client=FINAL)
    verdict = judge(h.records, FINAL)
    assert verdict.ok, verdict.describe()


def test_planted_lost_write_is_caught() -> None:
    h = base()
    h.get("a", "v2", 20, 21, version=11, client=FINAL)  # v3 was acknowledged, then vanished
    verdict = judge(h.records, FINAL)
    assert verdict.linearizable is False
    assert any("'v3'" in line for line in verdict.lost), verdict.lost
    assert verdict.version_errors  # and it went back in versions


def test_lost_write_to_absent_key_is_caught() -> None:
    h = Builder()
    h.put("b", "x", 1, 2, version=5)
    h.get("b", None, 3, 4, version=0, client=FINAL)
    verdict = judge(h.records, FINAL)
    assert verdict.linearizable is False
    assert verdict.lost == ["'b': 'x' (#0) acknowledged, key absent"]


def test_planted_stale_read_is_caught() -> None:
    h = base()
    h.get("a", "v2", 11, 12, version=11)  # after v3 was read at 9..10
    h.get("a", "v3", 20, 21, version=12, client=FINAL)
    verdict = judge(h.records, FINAL)
    assert verdict.linearizable is False
    assert "not linearizable" in verdict.message
    assert not verdict.lost  # the final state is right: only the read was stale
    assert any("observed version 11" in e for e in verdict.version_errors)


def test_wrongly_refused_cas_is_caught() -> None:
    h = Builder()
    h.put("a", "v1", 1, 2, version=10)
    h.cas("a", "v1", "v2", 3, 4, succeeded=False, version=10)
    assert judge(h.records, FINAL).linearizable is False


def test_unknown_write_may_or_may_not_have_applied() -> None:
    for final in ("v1", "v2"):
        h = Builder()
        h.put("a", "v1", 1, 2, version=10)
        h.put("a", "v2", 3, 0, version=0, outcome="unknown")
        h.get("a", final, 20, 21, version=10 if final == "v1" else 11, client=FINAL)
        verdict = judge(h.records, FINAL)
        assert verdict.ok, (final, verdict.describe())


def test_failed_write_must_not_have_applied() -> None:
    h = Builder()
    h.put("a", "v1", 1, 2, version=10)
    h.put("a", "v2", 3, 4, version=0, outcome="failed")
    h.get("a", "v2", 20, 21, version=11, client=FINAL)
    verdict = judge(h.records, FINAL)
    assert verdict.linearizable is False
    assert verdict.lost == ["'a': final value 'v2' was never written"]


def test_one_value_two_versions_is_caught() -> None:
    h = Builder()
    h.put("a", "v1", 1, 2, version=10)
    h.get("a", "v1", 3, 4, version=13)
    assert any("seen at version 10 and at 13" in e for e in judge(h.records, FINAL).version_errors)


def test_outcomes_map_to_checker_ops() -> None:
    h = Builder()
    h.put("a", "ok", 1, 3, version=10)
    h.put("a", "lost", 4, 0, version=0, outcome="unknown")
    h.put("a", "never", 5, 6, version=0, outcome="failed")
    ops = to_ops(h.records)  # in microseconds since the first call
    assert [(op.value, op.call, op.ret) for op in ops] == [("ok", 0, 2), ("lost", 3, None)]
    assert lost_writes(h.records, FINAL) == []  # no final reads, nothing to judge


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OverloadedError("busy", reason=Reason.OVERLOADED), "failed"),
        (NotLeaderError("elsewhere", reason=Reason.NOT_LEADER), "failed"),
        (StaleMapError("moved", reason=Reason.STALE_MAP), "failed"),
        (UnavailableError("draining", reason=Reason.SHUTTING_DOWN), "failed"),
        (UnavailableError("connection lost", code=grpc.StatusCode.UNAVAILABLE), "unknown"),
        (DeadlineExceededError("slow", code=grpc.StatusCode.DEADLINE_EXCEEDED), "unknown"),
    ],
)
def test_only_errors_that_prove_no_effect_are_failures(error: KvError, expected: str) -> None:
    assert outcome_of(error) == expected
