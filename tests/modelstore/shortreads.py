"""Positional reads that return fewer bytes than asked, as FUSE and NFS may (a local filesystem
never does, so a store that took one read for the whole passed every other test)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import botocore.response
import pytest

SHORT_READ = 7
"""The most bytes one read returns: less than any head, and prime, so no read lines up with one."""


def force_short_reads(monkeypatch: pytest.MonkeyPatch, most: int = SHORT_READ) -> None:
    """Makes every ``os.pread`` and ``os.preadv`` of this process return at most ``most`` bytes."""
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, size: int, offset: int) -> bytes:
        return real_pread(fd, min(size, most), offset)

    def preadv(fd: int, buffers: Sequence[bytearray | memoryview], offset: int) -> int:
        first = memoryview(buffers[0])
        return real_preadv(fd, [first[: min(len(first), most)]], offset)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)


def force_short_body_reads(monkeypatch: pytest.MonkeyPatch, most: int = SHORT_READ) -> None:
    """Makes every read of an S3 answer's body in this process return at most ``most`` bytes, as
    a read of a urllib3 stream may (how many it returns depends on urllib3's version and the
    transfer coding)."""
    real_read = botocore.response.StreamingBody.read

    def read(self: botocore.response.StreamingBody, amt: int | None = None) -> bytes:
        data: bytes = real_read(self, most if amt is None else min(amt, most))
        return data

    monkeypatch.setattr(botocore.response.StreamingBody, "read", read)
