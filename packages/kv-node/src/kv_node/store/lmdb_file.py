"""Check an LMDB data file before LMDB maps it.

LMDB trusts its file: an empty ``data.mdb`` is silently initialised as a new,
empty store, and a truncated one is mapped anyway, so the first read past
the end kills the process with SIGBUS. Both meta pages (pages 0 and 1) say
how large the file must be: the newest committed transaction's last page.
Reading them with plain file I/O, before any mapping, turns both failures
into a refusal that names the file.

Offsets are those of LMDB 0.9 on a 64-bit build (checked against files it
wrote): a meta page is a 16-byte page header followed by ``MDB_meta``, in the
machine's own byte order, as LMDB writes it.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

from kv_node.store import StoreError

DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"
MAGIC = 0xBEEFC0DE
FORMAT_VERSION = 1
META_PAGES = 2
_PAGE_HEADER_BYTES = 16
_HEAD = struct.Struct("=IIQQ")  # mm_magic, mm_version, mm_address, mm_mapsize
_PAGE_SIZE_OFFSET = _PAGE_HEADER_BYTES + 24  # mm_dbs[FREE_DBI].md_pad holds the page size
_TAIL = struct.Struct("=QQ")  # mm_last_pg, mm_txnid
_TAIL_OFFSET = _PAGE_HEADER_BYTES + 120
_MIN_PAGE_SIZE = 512
_MAX_PAGE_SIZE = 65536


class Meta(NamedTuple):
    page_size: int
    last_page: int
    txnid: int


def check_data_file(path: Path) -> Meta:
    """The newest valid meta page of ``path``; StoreError if the file cannot be LMDB's."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            first = f.read(_TAIL_OFFSET + _TAIL.size)
            if size == 0:
                raise StoreError(f"{path} is empty: the store's data is gone")
            meta0 = _read_meta(path, first, size)
            f.seek(meta0.page_size)
            meta1 = _read_meta(path, f.read(_TAIL_OFFSET + _TAIL.size), size - meta0.page_size)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
    newest = max(meta0, meta1, key=lambda m: m.txnid)
    needed = (max(meta0.last_page, meta1.last_page) + 1) * newest.page_size
    if size < needed:
        raise StoreError(
            f"{path} is truncated: {size} bytes, but its last transaction needs {needed}"
        )
    return newest


def _read_meta(path: Path, page: bytes, available: int) -> Meta:
    if available < _TAIL_OFFSET + _TAIL.size:
        raise StoreError(f"{path} is truncated: too short to hold LMDB's meta pages")
    magic, version, _, _ = _HEAD.unpack_from(page, _PAGE_HEADER_BYTES)
    if magic != MAGIC:
        raise StoreError(f"{path} is not an LMDB data file (bad magic number)")
    if version != FORMAT_VERSION:
        raise StoreError(f"{path} has LMDB format {version}; this build reads {FORMAT_VERSION}")
    (page_size,) = struct.unpack_from("=I", page, _PAGE_SIZE_OFFSET)
    if not _MIN_PAGE_SIZE <= page_size <= _MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise StoreError(f"{path} is damaged: page size {page_size} is impossible")
    last_page, txnid = _TAIL.unpack_from(page, _TAIL_OFFSET)
    if last_page < META_PAGES - 1:
        raise StoreError(f"{path} is damaged: last page {last_page} precedes the meta pages")
    return Meta(page_size, last_page, txnid)
