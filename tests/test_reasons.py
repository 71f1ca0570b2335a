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


def _looks_like_a_reason(name: str, value: object) -> bool:
    """A string constant named after its own UPPER_SNAKE value (how a code is spelled as a member
    of the catalogue), one with a reason's value, or one named as a reason."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Z][A-Z0-9_]*", value):
        return False
    return value == name or value in Reason.__members__ or "REASON" in name


def test_no_reason_is_a_module_constant_outside_the_catalogue() -> None:
    """``POLICY_TOO_LARGE = "POLICY_TOO_LARGE"`` in a module: the test below sees only literals
    in calls, so a reason passed by a constant's name escaped it, and the catalogue."""
    found = []
    for module, (path, _) in GRAPH.items():
        if module == "strongroom.reasons":
            continue
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.Assign | ast.AnnAssign) or not _literal(node.value):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [
                f"{path.relative_to(REPO)}:{node.lineno} {t.id} = {node.value.value!r}"  # type: ignore[union-attr]
                for t in targets
                if isinstance(t, ast.Name) and _looks_like_a_reason(t.id, node.value.value)  # type: ignore[union-attr]
            ]
    assert found == []


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
