"""A call queued in a lane behind an unanswered call leaves the lane unsent at its patience.

A paused node accepts requests and never answers; calls queued behind the one it holds were
never sent, so they may go to another replica, even unconditional writes. One that was
already sent (in a batch) is not taken back. Event-driven: the stuck node is an Event that
is never set; the only clock is the patience under test.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kv.v1 import kv_pb2
from kv_client import _calls
from kv_client.coalesce import AsyncLane, AttemptFailed, CoalesceConfig

PATIENCE = 0.05
LONG = 30.0
TEST_TIMEOUT = 5.0


def test_a_queued_call_leaves_a_stuck_lane_unsent_at_its_patience() -> None:
    async def main() -> None:
        never = asyncio.Event()
        sent_batches: list[kv_pb2.BatchRequest] = []

        async def stuck_unary() -> Any:
            await never.wait()

        async def send_batch(request: kv_pb2.BatchRequest, timeout: float) -> Any:
            sent_batches.append(request)
            await never.wait()

        lane = AsyncLane(CoalesceConfig(max_in_flight=1), send_batch)
        deadline = time.monotonic() + LONG
        holder = asyncio.ensure_future(lane.submit(_calls.put("a", "1"), deadline, stuck_unary))
        await asyncio.sleep(0)  # let it take the lane's one slot
        with pytest.raises(AttemptFailed) as left:
            await lane.submit(
                _calls.put("b", "2"),
                deadline,
                stuck_unary,
                patience=time.monotonic() + PATIENCE,
            )
        assert left.value.never_sent
        assert not sent_batches  # it never went out behind the stuck call
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))
