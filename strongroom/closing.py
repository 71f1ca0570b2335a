"""The context-manager half of anything with a ``close()``: ``with obj:`` closes it on the way out."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """Mixin: ``__enter__`` returns the object, ``__exit__`` calls its :meth:`close`."""

    def close(self) -> None:
        """Releases what the object holds (idempotent); subclasses implement it."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
