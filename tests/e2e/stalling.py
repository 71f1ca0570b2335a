"""A real model store that stalls one download midway: what a slow store or network looks like
to a model load, for the tests of a load its caller cancels."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from strongroom.modelstore._ranges import Frame, copied_into


class _StalledReader:
    """A real stored artifact's byte range, sent as all but its last 64 bytes (the header among
    them: the load asks for its key) and then nothing until the test lets it go on."""

    def __init__(self, inner: Any, stall: StallOnce) -> None:
        self._inner = inner
        self._stall = stall
        self.record = inner.record
        self.offset = inner.offset

    def __enter__(self) -> _StalledReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        data = b"".join(self._inner.chunks(chunk_size))
        yield data[:-64]
        self._stall.stalled.set()
        self._stall.go_on.wait(60)
        yield data[-64:]

    def chunks_into(self, chunk_size: int, frame: Frame) -> Iterator[memoryview]:
        """What the store's GetModel reads (each piece into its message), stalled the same way."""
        return copied_into(self.chunks(chunk_size), frame)


class StallOnce:
    """Stands in for the real model store's ``storage.open`` (set it with ``monkeypatch``):
    the first download of the store version ``version`` stalls (:attr:`stalled` is set once
    its first bytes are sent) until :attr:`go_on` is set; every other one is served as stored."""

    def __init__(self, storage: Any, version: str) -> None:
        self._open = storage.open
        self._version = version
        self._used = False
        self.stalled = threading.Event()
        self.go_on = threading.Event()

    def __call__(self, name: str, version: str, **kwargs: Any) -> Any:
        reader = self._open(name, version, **kwargs)
        if version != self._version or self._used:
            return reader
        self._used = True
        return _StalledReader(reader, self)
