"""Every operation the chaos load made and every fault it suffered, as seen from outside.

The recorder wraps the SDK: each call is recorded at invocation and at its return with one of
three outcomes. ``ok``: the answer came back. ``failed``: the SDK's error says the request
never ran (see ``outcome_of``), so it certainly had no effect. ``unknown``: anything else (a
timeout, a connection lost after sending): it may or may not have taken effect, and the checker
must allow both.

Faults are recorded into the same history (start and end on the same clock), so the report
can say what the clients saw during each one.

The history is bounded: past ``max_ops`` the recorder refuses to start new operations (the
load stops), so a long run cannot grow without bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

from kv_client import (
    NO_RETRY,
    AsyncClient,
    InvalidArgumentError,
    KvError,
    TooLargeError,
    Versioned,
    WriteResult,
)
from kv_common.wire import Reason

Kind = Literal["put", "cas", "get"]
Outcome = Literal["ok", "failed", "unknown", "pending"]
T = TypeVar("T")

DEFAULT_MAX_OPS = 200_000
OP_TIMEOUT = 5.0
"""Seconds one SDK call may take, retries included: the SDK's default, so that "failed after
the SDK's retries" in the report is what a user with default settings would see."""


def now_ns() -> int:
    return time.monotonic_ns()


@dataclass(frozen=True)
class Record:
    """One operation. ``value`` is unique per write, so it names the write everywhere."""

    index: int
    client: int
    kind: Kind
    key: str
    call: int  # monotonic ns
    value: str | None = None  # put, cas: the value written
    expected: str | None = None  # cas: the value it expects (None = absent)
    expected_version: int | None = None  # cas: the version it expects (None = absent)
    ret: int | None = None  # monotonic ns of the answer; None unless ok or failed
    outcome: Outcome = "pending"
    read: str | None = None  # get: value read (None = absent)
    succeeded: bool | None = None  # cas
    version: int | None = None  # put/cas: version returned; get: version read
    error: str | None = None


@dataclass(frozen=True)
class Fault:
    name: str
    target: str
    start: int
    end: int | None = None
    note: str = ""


def outcome_of(error: KvError) -> Outcome:
    """``failed`` only when the SDK's error proves the request did not run, else ``unknown``.

    Proof: the node refused before running it (overloaded, shutting down, a stale map: the
    SDK's ``never_ran`` and ``invalid_metadata`` flags, and the SHUTTING_DOWN reason), or the
    SDK refused to send it (an invalid argument or a value over the limit). Everything else —
    a deadline, UNAVAILABLE after the request may have been sent, an internal error — might
    have applied. A put is retried by the SDK only after a provable non-run, so its final
    error speaks for every attempt.
    """
    if error.never_ran or error.invalid_metadata or error.reason == Reason.SHUTTING_DOWN:
        return "failed"
    if isinstance(error, InvalidArgumentError | TooLargeError):
        return "failed"
    return "unknown"


@dataclass
class History:
    """Thread-safe: the load appends from its event loop, faults from the schedule's thread."""

    max_ops: int = DEFAULT_MAX_OPS
    records: list[Record] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    started: int = field(default_factory=now_ns)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _changed: threading.Condition = field(init=False)
    _completed: int = 0
    _acked_writes: int = 0

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)

    @property
    def full(self) -> bool:
        return len(self.records) >= self.max_ops

    def begin(self, record: Record) -> int | None:
        """Record an invocation; None when the history is full (the caller must not send)."""
        with self._lock:
            if len(self.records) >= self.max_ops:
                return None
            index = len(self.records)
            self.records.append(replace(record, index=index, call=now_ns()))
            return index

    def finish(
        self,
        index: int,
        outcome: Outcome,
        *,
        error: str | None = None,
        read: str | None = None,
        succeeded: bool | None = None,
        version: int | None = None,
    ) -> Record:
        """Record the return of operation ``index`` (its return time is taken now)."""
        with self._changed:
            record = replace(
                self.records[index],
                outcome=outcome,
                error=error,
                read=read,
                succeeded=succeeded,
                version=version,
            )
            if outcome in ("ok", "failed"):
                record = replace(record, ret=max(now_ns(), record.call + 1))
            self.records[index] = record
            self._completed += 1
            if record.outcome == "ok" and record.kind != "get":
                self._acked_writes += 1
            self._changed.notify_all()
            return record

    def wait_for(self, *, completed: int = 0, acked_writes: int = 0, timeout: float) -> bool:
        """Block until at least this many more ops completed / writes were acknowledged than
        now; False if ``timeout`` passed first (the schedule goes on regardless)."""
        with self._changed:
            want_completed = self._completed + completed
            want_acked = self._acked_writes + acked_writes
            return self._changed.wait_for(
                lambda: self._completed >= want_completed and self._acked_writes >= want_acked,
                timeout,
            )

    def fault_started(self, name: str, target: str, note: str = "") -> int:
        with self._lock:
            self.faults.append(Fault(name, target, now_ns(), note=note))
            return len(self.faults) - 1

    def fault_ended(self, index: int) -> None:
        with self._lock:
            self.faults[index] = replace(self.faults[index], end=now_ns())

    def fault_note(self, index: int, note: str) -> None:
        """Say what a fault achieved, once it is known (shown in the table)."""
        with self._lock:
            self.faults[index] = replace(self.faults[index], note=note)

    @property
    def acked_writes(self) -> int:
        with self._lock:
            return self._acked_writes

    def seconds(self, ns: int) -> float:
        """A history time as seconds since the history started."""
        return (ns - self.started) / 1e9


@dataclass(frozen=True)
class Answer:
    """What an ok call returned, in the history's terms."""

    version: int | None
    read: str | None = None
    succeeded: bool | None = None


class RecordingClient:
    """One load client: SDK calls that record themselves into a ``History``.

    Conditional writes go through a second client with retries off. The SDK retries them, and
    a retried one whose first attempt applied reports ``succeeded=False`` (the SDK documents
    this); the history could not tell that from a real refusal, and a refusal that is not one
    is exactly what the checker must be able to trust. With retries off, the SDK resends only
    after a NOT_LEADER refusal (which never ran), so ``succeeded=False`` means "did not apply".
    Plain puts and gets keep the SDK's default retries, as users have them.
    """

    def __init__(self, client_id: int, addresses: list[str], history: History) -> None:
        self.client_id = client_id
        self.history = history
        self._kv = AsyncClient(addresses, timeout=OP_TIMEOUT)
        self._conditional = AsyncClient(addresses, timeout=OP_TIMEOUT, retry=NO_RETRY)

    async def close(self) -> None:
        await self._kv.close()
        await self._conditional.close()

    async def _run(
        self, record: Record, call: Callable[[], Awaitable[T]], done: Callable[[T], Answer]
    ) -> Record | None:
        """Send ``call`` and record it; the finished record, or None when the history is full."""
        index = self.history.begin(record)
        if index is None:
            return None
        try:
            result = await call()
        except KvError as exc:
            return self.history.finish(index, outcome_of(exc), error=repr(exc))
        except BaseException as exc:  # cancelled, or an SDK bug: nothing is known
            self.history.finish(index, "unknown", error=repr(exc))
            raise
        answer = done(result)
        return self.history.finish(
            index, "ok", read=answer.read, succeeded=answer.succeeded, version=answer.version
        )

    async def put(self, key: str, value: str) -> Record | None:
        record = Record(-1, self.client_id, "put", key, 0, value=value)
        return await self._run(record, lambda: self._kv.put(key, value), lambda v: Answer(v))

    async def cas(self, key: str, value: str, expected: Versioned | None) -> Record | None:
        """put_if_version on ``expected`` (a value and version this client saw), or
        put_if_absent when ``expected`` is None."""
        record = Record(
            -1,
            self.client_id,
            "cas",
            key,
            0,
            value=value,
            expected=None if expected is None else expected.value.decode(),
            expected_version=None if expected is None else expected.version,
        )

        def call() -> Awaitable[WriteResult]:
            if expected is None:
                return self._conditional.put_if_absent(key, value)
            return self._conditional.put_if_version(key, value, expected.version)

        return await self._run(record, call, lambda r: Answer(r.version, succeeded=r.succeeded))

    async def get(self, key: str) -> Record | None:
        record = Record(-1, self.client_id, "get", key, 0)

        def done(found: Versioned | None) -> Answer:
            if found is None:
                return Answer(None)
            return Answer(found.version, read=found.value.decode())

        return await self._run(record, lambda: self._kv.get_versioned(key), done)


__all__ = [
    "DEFAULT_MAX_OPS",
    "Fault",
    "History",
    "Outcome",
    "Record",
    "RecordingClient",
    "outcome_of",
]
