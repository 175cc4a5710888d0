"""Judging a chaos history: linearizable per key, versions consistent, no acknowledged write lost.

The project's checker (``kv_raft.sim.linearizability``) models each key as a register of values
with compare-and-swap *on the value*. kv's conditional writes compare *versions*, and every read
returns a version too. The bridge: every value the load writes is unique, so a value names the
one write that produced it. A put_if_version on version v is issued only with the value the
client saw at v (from its own read or acknowledged write), so "version is v" is "value is the
one written at v": the checker's value-cas models it exactly, and put_if_absent is a cas from
absent. What the register model cannot see, versions, is checked here on its own:

- one value, one version: every observation of a value (the write's answer, any read) carries
  the same version, and two values of one key never share a version;
- versions follow real time: an operation that starts after another finished never observes
  a lower version, and an acknowledged write's version is above everything seen before it.

"No acknowledged write lost" follows from linearizability once the history ends with a read of
every key after the faults healed; ``lost_writes`` also says it directly, in words a failing
run can act on: the final value must come from a write that no acknowledged write followed.

Outcomes map to the checker so: ``ok`` -> a returned op; ``failed`` (provably never ran) ->
dropped; ``unknown`` -> a write with no return (it may have applied at any time after its call,
or never), or nothing for a read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from chaos.history import Record

from kv_raft.sim.linearizability import CheckTimeout, Op, check_history

MAX_STATES = 2_000_000
"""Search bound per key: past it the check says "inconclusive", never "passed"."""


@dataclass
class Verdict:
    linearizable: bool | None  # None: inconclusive (the search hit MAX_STATES)
    message: str
    version_errors: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.linearizable is True and not self.version_errors and not self.lost

    def describe(self) -> str:
        lines = [f"linearizability: {self.message}"]
        lines += [f"version: {e}" for e in self.version_errors[:10]]
        lines += [f"lost write: {e}" for e in self.lost[:10]]
        return "\n".join(lines)


def to_ops(records: Sequence[Record]) -> list[Op]:
    """The checker's view of the history (see the module docstring for the mapping).

    Times become microseconds since the first call, so a failure message is readable. Rounding
    down keeps every real-time order or turns it into an overlap, which only permits more.
    """
    origin = min((r.call for r in records), default=0)
    ops: list[Op] = []
    for r in records:
        if r.outcome in ("failed", "pending") or (r.kind == "get" and r.outcome != "ok"):
            continue
        call = (r.call - origin) // 1000
        ret = (
            None if r.outcome != "ok" or r.ret is None else max(call + 1, (r.ret - origin) // 1000)
        )
        if r.kind == "put":
            assert r.value is not None
            ops.append(Op(r.client, r.key, "put", r.value, None, None, call, ret))
        elif r.kind == "cas":
            assert r.value is not None
            output = r.succeeded if ret is not None else None
            ops.append(Op(r.client, r.key, "cas", r.value, r.expected, output, call, ret))
        else:
            ops.append(Op(r.client, r.key, "get", None, None, r.read, call, ret))
    return ops


def check_linearizable(records: Sequence[Record]) -> tuple[bool | None, str]:
    try:
        result = check_history(to_ops(records), max_states=MAX_STATES)
    except CheckTimeout as exc:
        return None, str(exc)
    return result.ok, result.message


def _observed_version(r: Record) -> int | None:
    """The version an ok op observed: a write's new version, a read's, a failed cas's current
    (0 = absent, which is no version)."""
    if r.outcome != "ok" or r.version is None or r.version == 0:
        return None
    return r.version


def check_versions(records: Sequence[Record]) -> list[str]:
    errors: list[str] = []
    by_value: dict[tuple[str, str], tuple[int, Record]] = {}
    by_version: dict[tuple[str, int], tuple[str, Record]] = {}
    for r in records:
        version = _observed_version(r)
        if version is None:
            continue
        if r.kind == "put" or (r.kind == "cas" and r.succeeded):
            value = r.value
        elif r.kind == "get":
            value = r.read
        else:
            continue  # a refused cas reports the current version but not the value
        assert value is not None
        seen = by_value.setdefault((r.key, value), (version, r))
        if seen[0] != version:
            errors.append(f"{r.key!r}={value!r} seen at version {seen[0]} and at {version}")
        other = by_version.setdefault((r.key, version), (value, r))
        if other[0] != value:
            errors.append(f"{r.key!r} version {version} holds both {other[0]!r} and {value!r}")
    errors += _versions_follow_real_time(records)
    return errors


def _versions_follow_real_time(records: Sequence[Record]) -> list[str]:
    """Per key, no op observes a version below one observed by an op that finished before it
    started (strictly above, for an acknowledged write)."""
    errors: list[str] = []
    by_key: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if _observed_version(r) is not None:
            by_key[r.key].append(r)
    for key, ops in by_key.items():
        finished = sorted(ops, key=lambda r: r.ret or 0)
        highest: Record | None = None
        position = 0
        for r in sorted(ops, key=lambda r: r.call):
            while position < len(finished) and (finished[position].ret or 0) < r.call:
                done = finished[position]
                if highest is None or (done.version or 0) > (highest.version or 0):
                    highest = done
                position += 1
            if highest is None:
                continue
            version, floor = r.version or 0, highest.version or 0
            wrote = r.kind == "put" or (r.kind == "cas" and r.succeeded)
            if version < floor or (wrote and version == floor):
                errors.append(
                    f"{key!r}: {r.kind} #{r.index} (client {r.client}) observed version "
                    f"{version} after #{highest.index} had observed {floor}"
                )
    return errors


def lost_writes(records: Sequence[Record], final_client: int) -> list[str]:
    """Acknowledged writes the final reads (by ``final_client``) contradict.

    The final value of a key must be written by some write W (absent only if no write was
    acknowledged). Any acknowledged write A called after W returned came after W, so a final
    value of W means A was lost; the same holds for A when the key reads absent.
    """
    writes: dict[tuple[str, str], Record] = {}
    for r in records:
        if r.kind in ("put", "cas") and r.value is not None and r.outcome != "failed":
            writes[(r.key, r.value)] = r
    lost: list[str] = []
    last_read: dict[str, Record] = {}  # the final client reads each key until it answers
    for r in records:
        if r.client == final_client and r.kind == "get":
            last_read[r.key] = r
    for final in last_read.values():
        if final.outcome != "ok":
            lost.append(f"{final.key!r}: the final read failed ({final.error})")
            continue
        acked = [
            r
            for r in records
            if r.key == final.key
            and r.outcome == "ok"
            and (r.kind == "put" or (r.kind == "cas" and r.succeeded))
            and r.client != final_client
        ]
        if final.read is None:
            lost += [
                f"{final.key!r}: {a.value!r} (#{a.index}) acknowledged, key absent" for a in acked
            ]
            continue
        source = writes.get((final.key, final.read))
        if source is None:
            lost.append(f"{final.key!r}: final value {final.read!r} was never written")
            continue
        if source.ret is None or source.outcome != "ok":
            continue  # an unknown-outcome write may have applied at any time: no bound
        lost += [
            f"{final.key!r}: {a.value!r} (#{a.index}) acknowledged after {final.read!r} "
            f"(#{source.index}) returned, but the key reads {final.read!r}"
            for a in acked
            if a.call > source.ret
        ]
    return lost


def judge(records: Sequence[Record], final_client: int) -> Verdict:
    linearizable, message = check_linearizable(records)
    return Verdict(
        linearizable,
        message,
        version_errors=check_versions(records),
        lost=lost_writes(records, final_client),
    )


__all__ = ["MAX_STATES", "Verdict", "check_versions", "judge", "lost_writes", "to_ops"]
