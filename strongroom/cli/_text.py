"""What the command line prints of text a server sent: never a raw terminal control sequence."""

from __future__ import annotations


def printable(text: object) -> str:
    """``text`` with every non-printable character (escape sequences, tabs, newlines) shown as its
    Python escape: a model store or broker that is not what it should be must not drive the
    operator's terminal or forge extra lines and columns of output."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text)
    )
