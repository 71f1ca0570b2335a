"""A secret value that never shows itself in ``repr``, ``str`` or logs."""

from __future__ import annotations

import os
from pathlib import Path

from strongroom.errors import FailedPrecondition
from strongroom.reasons import Reason


def require_private(file: Path, what: str) -> None:
    """Refuses (FAILED_PRECONDITION, SECRET_FILE_PERMISSIONS) a secret file that group or others
    may read: a secret in such a file is a configuration error, not silently accepted. Raises
    OSError if the file cannot be stat'ed."""
    mode = file.stat().st_mode
    if mode & 0o077:
        raise FailedPrecondition(
            f"{what}: {file} is readable by group or others (mode {mode & 0o777:o}); use 0600",
            reason=Reason.SECRET_FILE_PERMISSIONS,
        )


class Secret:
    """Holds a secret (a PIN, a key) and prints as ``Secret('***')``.

    Read it only where it is used, with :meth:`reveal`. Load it from a file or an environment
    variable (:meth:`load`), never from the command line.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """Returns the secret bytes."""
        return self._value

    def reveal_text(self) -> str:
        """Returns the secret as UTF-8 text without a trailing newline."""
        return self._value.decode("utf-8").rstrip("\r\n")

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def load(
        cls, *, file: Path | None = None, env: str | None = None, what: str, single: bool = False
    ) -> Secret:
        """Loads a secret from ``env`` when that variable is set, else from ``file``.

        A file must not be readable by group or others: a secret in a world-readable file is
        treated as a configuration error rather than silently accepted. With ``single`` (the
        services pass it in production) a secret configured as a file and also present in the
        environment is refused (SECRET_AMBIGUOUS): the variable would silently replace the file
        the operator provisioned, and a container's environment is the easier of the two to
        extend.
        """
        if env and os.environ.get(env):
            if single and file is not None:
                raise FailedPrecondition(
                    f"{what}: both ${env} and the file {file} are set; in production give it one "
                    "way only (unset the variable, or drop the file setting)",
                    reason=Reason.SECRET_AMBIGUOUS,
                )
            return cls(os.environ[env].encode("utf-8"))
        if file is None:
            raise FailedPrecondition(
                f"{what}: no secret configured (set ${env} or a file)"
                if env
                else f"{what}: no file",
                reason=Reason.SECRET_MISSING,
            )
        try:
            require_private(file, what)
            return cls(file.read_bytes())
        except OSError as exc:
            raise FailedPrecondition(
                f"{what}: cannot read {file}: {exc.strerror}", reason=Reason.SECRET_MISSING
            ) from None
