"""The long-key mapping keeps what docs/decisions/0003-long-keys.md promises a future Scan."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kv_common.limits import MAX_KEY_BYTES
from kv_node.store.lmdb_keys import (
    INLINE_KEY_BYTES,
    STORED_KEY_BYTES,
    is_bucket,
    pack_bucket,
    stored_key,
    unpack_bucket,
)

# Keys near the threshold, over a tiny alphabet so that long shared prefixes are common.
_PREFIXES = st.sampled_from([b"", b"a" * (INLINE_KEY_BYTES - 2), b"a" * INLINE_KEY_BYTES])
_TAILS = st.binary(max_size=8).map(lambda b: bytes(x % 3 + 97 for x in b))
KEYS = st.builds(
    lambda p, t, n: (p + t + b"b" * n)[:MAX_KEY_BYTES], _PREFIXES, _TAILS, st.integers(0, 20)
)


@given(KEYS, KEYS)
def test_stored_keys_sort_like_keys_except_long_keys_sharing_the_inline_prefix(
    a: bytes, b: bytes
) -> None:
    if a == b:
        assert stored_key(a) == stored_key(b)
        return
    both_long_same_prefix = (
        len(a) > INLINE_KEY_BYTES
        and len(b) > INLINE_KEY_BYTES
        and a[:INLINE_KEY_BYTES] == b[:INLINE_KEY_BYTES]
    )
    if both_long_same_prefix:
        return  # digest order inside the run; a Scan sorts the run by full key
    assert (stored_key(a) < stored_key(b)) == (a < b)


@given(KEYS)
def test_inline_and_digested_forms_cannot_be_confused(key: bytes) -> None:
    stored = stored_key(key)
    assert len(stored) <= STORED_KEY_BYTES
    assert is_bucket(stored) == (len(key) > INLINE_KEY_BYTES)
    assert (stored == key) == (len(key) <= INLINE_KEY_BYTES)


@given(st.dictionaries(st.binary(max_size=600), st.binary(max_size=100), max_size=5))
def test_buckets_round_trip(entries: dict[bytes, bytes]) -> None:
    assert unpack_bucket(pack_bucket(entries)) == entries
