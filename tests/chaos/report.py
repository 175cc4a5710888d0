"""The per-fault table a chaos run prints: what the clients saw during each fault.

A fault's window runs from its start to the next fault's start (or the end of the load), so
every operation is counted once. "Writable again" is the time from the fault's start (and from
its end) until every partition the load writes to has acknowledged a write that was *called*
after the fault started (a write called earlier may have been applied before the fault).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from chaos.history import Fault, History, Record


@dataclass(frozen=True)
class FaultRow:
    fault: Fault
    ops: int
    acked_writes: int
    failed: int
    unknown: int
    writable_after: float | None  # seconds from the fault's start; None: not within the run
    writable_after_end: float | None  # seconds from the fault's end


def _acked_write(r: Record) -> bool:
    return r.outcome == "ok" and (r.kind == "put" or (r.kind == "cas" and bool(r.succeeded)))


def fault_rows(
    history: History, partitions: Mapping[str, int], load_clients: int
) -> list[FaultRow]:
    records = [r for r in history.records if r.client < load_clients]
    faults = sorted(history.faults, key=lambda f: f.start)
    rows: list[FaultRow] = []
    for i, fault in enumerate(faults):
        until = faults[i + 1].start if i + 1 < len(faults) else None
        window = [r for r in records if r.call >= fault.start and (until is None or r.call < until)]
        rows.append(
            FaultRow(
                fault,
                ops=len(window),
                acked_writes=sum(_acked_write(r) for r in window),
                failed=sum(r.outcome == "failed" for r in window),
                unknown=sum(r.outcome == "unknown" for r in window),
                writable_after=_writable_after(records, partitions, fault.start),
                writable_after_end=(
                    None if fault.end is None else _writable_after(records, partitions, fault.end)
                ),
            )
        )
    return rows


def _writable_after(
    records: Sequence[Record], partitions: Mapping[str, int], since: int
) -> float | None:
    first: dict[int, int] = {}
    for r in records:
        if r.call >= since and _acked_write(r) and r.ret is not None:
            partition = partitions[r.key]
            first[partition] = min(first.get(partition, r.ret), r.ret)
    wanted = set(partitions.values())
    if set(first) != wanted:
        return None
    return (max(first.values()) - since) / 1e9


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def render(history: History, rows: Sequence[FaultRow], load_clients: int) -> str:
    header = (
        "| fault | node | at s | lasted s | ops | acked writes | failed | unknown "
        "| all partitions writable after s (from start / from end) |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        f = row.fault
        lasted = "-" if f.end is None else f"{(f.end - f.start) / 1e9:.2f}"
        name = f"{f.name} {f.note}".strip()
        lines.append(
            f"| {name} | {f.target} | {history.seconds(f.start):.2f} | {lasted} | {row.ops} "
            f"| {row.acked_writes} | {row.failed} | {row.unknown} "
            f"| {_seconds(row.writable_after)} / {_seconds(row.writable_after_end)} |"
        )
    load = [r for r in history.records if r.client < load_clients]
    lines.append(
        f"| (whole run) | | | | {len(load)} | {sum(_acked_write(r) for r in load)} "
        f"| {sum(r.outcome == 'failed' for r in load)} "
        f"| {sum(r.outcome == 'unknown' for r in load)} | |"
    )
    return "\n".join(lines)


__all__ = ["FaultRow", "fault_rows", "render"]
