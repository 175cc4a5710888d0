"""Wire conventions beyond the schema: metadata keys that node and SDK share."""

from __future__ import annotations

EPOCH_METADATA = "kv-epoch"
"""Set by a routing client to the cluster-map epoch it routed with.

A node that does not own the key answers FAILED_PRECONDITION instead of
forwarding, so the client learns its map is stale (Redis MOVED, TiKV
region errors) rather than silently paying an extra hop forever.
"""

HOP_METADATA = "kv-forwarded-by"
"""Set by a node on a request it forwards, to the forwarding node's id.

A node never forwards a request that already carries it, so a disagreement
between cluster maps can cost one extra hop but never a loop.
"""

STALE_MAP_PREFIX = "stale cluster map"
"""FAILED_PRECONDITION messages that mean "refresh your map and retry" start with this."""
