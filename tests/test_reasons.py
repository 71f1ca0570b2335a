"""One catalogue of reason codes: every reason is a member of strongroom.reasons.Reason, and no
module writes one as a bare string (two spellings of one code would drift)."""

from __future__ import annotations

import ast
import re

from strongroom.reasons import Reason
from tests.architecture.test_imports import GRAPH
from tests.conftest import REPO


def test_every_member_is_its_own_upper_snake_name() -> None:
    assert len(Reason) > 100
    for member in Reason:
        assert member.value == member.name
        assert re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", member.value)


def _literal(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_no_reason_is_written_as_a_bare_string() -> None:
    found = []
    for module, (path, _) in GRAPH.items():
        if module == "strongroom.reasons":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                found += [
                    f"{path.relative_to(REPO)}:{node.lineno} reason={kw.value.value!r}"  # type: ignore[attr-defined]
                    for kw in node.keywords
                    if kw.arg == "reason" and _literal(kw.value)
                ]
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "default_reason" for t in targets) and (
                    _literal(node.value)
                ):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} default_reason literal")
    assert found == []
