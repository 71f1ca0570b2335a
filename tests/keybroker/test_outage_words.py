"""What a remote caller is told of the broker's own failures: one closing phrase, and for the
audit log an operation from a closed set, the one README upgrade item 96 lists.

The phrase was written out three times (the audit log's answers, the tamper verdict's, the HSM
connection's), and the operation was whatever preceded `` the `` in a failed call's description:
a new call site's wording reached callers unlisted, a description without `` the `` reached them
whole (its path included, had it one).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from strongroom.keybroker.errors import (
    AUDIT_OPERATIONS,
    OPERATORS_LOG,
    AuditTampered,
    audit_failure,
    audit_operation,
)
from tests.conftest import REPO

_KEYBROKER = REPO / "services" / "keybroker"
_DESCRIBING = {"_call_failed", "_call_failed_in", "audit_failure"}


def _descriptions() -> list[tuple[Path, int, str]]:
    """Every literal description given to the functions that make a caller's audit-failure
    words, in the key broker's sources."""
    found = []
    for path in sorted(_KEYBROKER.glob("*.py")):
        tree = ast.parse(path.read_text())
        # One of them handing its own ``doing`` on is not a description.
        forwarding = {
            id(node)
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef) and function.name in _DESCRIBING
            for node in ast.walk(function)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in _DESCRIBING
                and node.args
            ):
                first = node.args[0]
                if id(node) in forwarding and isinstance(first, ast.Name):
                    continue
                if isinstance(first, ast.JoinedStr) and first.values:
                    first = first.values[0]  # an f-string: its literal beginning
                assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                    f"{path.name}:{node.lineno}: a description must begin with a literal"
                )
                found.append((path, node.lineno, first.value))
    return found


def test_every_failed_call_is_described_by_an_operation_of_the_set() -> None:
    found = _descriptions()
    assert len(found) > 10
    for path, line, doing in found:
        assert any(doing == op or doing.startswith(op + " ") for op in AUDIT_OPERATIONS), (
            f"{path.name}:{line}: {doing!r} begins with none of {AUDIT_OPERATIONS}"
        )


def test_every_operation_is_one_a_caller_can_be_told() -> None:
    used = {audit_operation(doing) for _, _, doing in _descriptions()}
    # "keep" is also the default (AUDIT_LOG_FULL, a failure of unknown kind).
    assert used | {"keep"} == set(AUDIT_OPERATIONS)


@pytest.mark.parametrize(
    ("doing", "told"),
    [
        ("look up the audit file", "look up"),
        ("write the audit head", "write"),
        ("writeback /srv/audit.log", "keep"),  # never a word (or path) outside the set
        ("keep", "keep"),
    ],
)
def test_a_description_is_reduced_to_its_operation(doing: str, told: str) -> None:
    assert audit_failure(doing) == f"the key broker cannot {told} its audit log{OPERATORS_LOG}"


def test_readme_item_96_lists_the_operations() -> None:
    readme = (REPO / "README.md").read_text()
    item = readme[readme.index("96. **The key broker's outage answers") :]
    listed = re.search(r"\(OP: (.*?) when no call\s+failed", item, re.DOTALL)
    assert listed is not None
    assert tuple(re.findall(r"`([^`]+)`", listed.group(1))) == AUDIT_OPERATIONS


def test_the_closing_phrase_is_written_once() -> None:
    """The constant, not a copy, in every answer that keeps the broker's details."""
    written = [
        path.name
        for path in sorted(_KEYBROKER.glob("*.py"))
        if "operator's log has the details" in path.read_text()
    ]
    assert written == ["errors.py"]
    assert AuditTampered("x").public.endswith(OPERATORS_LOG)
    assert OPERATORS_LOG == "; its operator's log has the details"
