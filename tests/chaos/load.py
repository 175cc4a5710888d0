"""The chaos load: a few concurrent SDK clients on a small key space, so operations collide.

Each worker is an ``asyncio`` task with its own seeded RNG and its own ``RecordingClient``;
all of them run on one event loop in a background thread, because the fault schedule must
own the main thread (see ``chaos.faults``). A worker picks put, conditional write or read on a
random key; a conditional write expects the value and version the worker last saw on that key
(from its own read or write) or, knowing nothing, that the key is absent.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass

from chaos.history import History, Record, RecordingClient

from kv_client import Versioned

PUT_SHARE = 0.35
CAS_SHARE = 0.30  # the rest are reads
STOP_TIMEOUT = 30.0
"""How long stopping may take: every in-flight op ends within the SDK timeout."""


@dataclass(frozen=True)
class LoadConfig:
    addresses: list[str]
    keys: list[str]
    clients: int
    seed: int
    deadline: float  # monotonic seconds: no op starts after it


class Load:
    def __init__(self, config: LoadConfig, history: History) -> None:
        self.config = config
        self.history = history
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chaos-load", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Let every worker finish its op in flight, then return. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError("the chaos load did not stop in time")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.error = exc

    async def _run(self) -> None:
        clients = [
            RecordingClient(worker, self.config.addresses, self.history)
            for worker in range(self.config.clients)
        ]
        try:
            await asyncio.gather(*(self._worker(c) for c in clients))
        finally:
            for client in clients:
                await client.close()

    def _done(self) -> bool:
        return self._stop.is_set() or self.history.full or time.monotonic() >= self.config.deadline

    async def _worker(self, client: RecordingClient) -> None:
        rng = random.Random(f"{self.config.seed}:{client.client_id}")
        seen: dict[str, Versioned] = {}
        written = 0
        while not self._done():
            key = rng.choice(self.config.keys)
            roll = rng.random()
            if roll < PUT_SHARE + CAS_SHARE:
                written += 1
                value = f"c{client.client_id}-{written}"
                if roll < PUT_SHARE:
                    record = await client.put(key, value)
                else:
                    record = await client.cas(key, value, seen.get(key))
            else:
                record = await client.get(key)
            if record is not None:
                _learn(seen, record)


def _learn(seen: dict[str, Versioned], record: Record) -> None:
    """What a finished op tells its worker about the key's current value and version."""
    if record.outcome != "ok":
        seen.pop(record.key, None)
        return
    value = record.read if record.kind == "get" else record.value
    if record.kind == "cas" and not record.succeeded:
        value = None  # refused: the version is known but not the value; read again
    if value is None or record.version is None:
        seen.pop(record.key, None)
    else:
        seen[record.key] = Versioned(value.encode(), record.version)


__all__ = ["Load", "LoadConfig"]
