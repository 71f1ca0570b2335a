"""What the command line prints of text a server sent: never a raw terminal control sequence."""

from __future__ import annotations

import re


def printable(text: object) -> str:
    """``text`` with every non-printable character (escape sequences, tabs, newlines) shown as its
    Python escape: a model store or broker that is not what it should be must not drive the
    operator's terminal or forge extra lines and columns of output."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text)
    )


# What a YAML stream may contain (YAML 1.1 "printable", as PyYAML's reader checks it; JSON
# documents are YAML too): anything else cannot be part of a policy any broker stored.
_NOT_IN_A_DOCUMENT = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def printable_document(text: str) -> str:
    """A policy document a server sent, with every character no YAML document can hold shown as
    its Python escape (ESC, BEL, the C1 controls such as CSI): the document a broker stored prints
    byte for byte, its line ends included, so that it can be saved, edited and set again, but a
    broker that is not what it should be cannot drive the operator's terminal through it."""
    return _NOT_IN_A_DOCUMENT.sub(
        lambda m: m.group().encode("unicode_escape").decode("ascii"), text
    )
