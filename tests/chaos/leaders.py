"""Which node leads a key's partition, asked of the nodes themselves.

The cluster map does not carry leaders, so the fault schedule asks: a Get marked as already
forwarded (``kv-forwarded-by``) is never forwarded again, so a node either serves it (it leads
the partition) or refuses it as NOT_LEADER naming the leader it knows. The probe is a read:
it changes nothing, and it is not part of the recorded history.
"""

from __future__ import annotations

import grpc

from kv.v1 import kv_pb2, kv_pb2_grpc
from kv_common.wire import HOP_METADATA, Reason, decode_status_details

PROBE_TIMEOUT = 1.0
PROBE_MARK = ((HOP_METADATA, "chaos-leader-probe"),)


def _ask(address: str, key: str) -> tuple[bool, str | None]:
    """(served, leader named in a NOT_LEADER refusal)."""
    with grpc.insecure_channel(address) as channel:
        stub = kv_pb2_grpc.KVServiceStub(channel)
        try:
            stub.Get(
                kv_pb2.GetRequest(key=key.encode()), timeout=PROBE_TIMEOUT, metadata=PROBE_MARK
            )
        except grpc.RpcError as exc:
            trailers = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
            info = decode_status_details(tuple(trailers or ()))
            if info is not None and info.reason == Reason.NOT_LEADER:
                return False, info.metadata.get("leader_id")
            return False, None
        return True, None


def leader_of(key: str, addresses: dict[str, str]) -> str | None:
    """The node that leads ``key``'s partition, or None when no node could say."""
    for node_id, address in sorted(addresses.items()):
        served, named = _ask(address, key)
        if served:
            return node_id
        if named is not None:
            return named
    return None


__all__ = ["leader_of"]
