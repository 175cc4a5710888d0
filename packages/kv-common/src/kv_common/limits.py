"""Request limits shared by the node (which enforces them) and the SDK.

The node is the authority: the SDK checks the key limits early only to give a
clearer error without a round trip.
"""

from __future__ import annotations

MAX_KEY_BYTES = 4096
"""Longest key accepted. Keys are routing input and index entries, so they stay small."""

DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
"""Largest value a node accepts unless started with --max-value-bytes."""

DEFAULT_MAX_BATCH_OPS = 1000
"""Most operations in one Batch call unless started with --max-batch-ops."""

DEFAULT_MAX_BATCH_BYTES = 4 * 1024 * 1024
"""Largest encoded Batch request (keys, values, framing) unless --max-batch-bytes is given."""
