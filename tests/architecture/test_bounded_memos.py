"""Every memo in the shipped packages is bounded: a long-running service must not grow with its inputs.

``functools.cache`` and ``functools.lru_cache(maxsize=None)`` keep every distinct argument forever;
in a broker that memoises on caller-supplied data (certificates, reports, keys) that is memory
growth per request, the kind issue 12 measured. So each ``lru_cache`` must state its bound — a
positive integer ``maxsize`` written where it is used (the implicit default of 128 is allowed by
Python, but a reader should not have to know it) — and ``functools.cache`` is not used at all.

The check is on the syntax tree of every Python file of every package (generated code excepted,
the same files as :mod:`tests.architecture.test_imports`), through any import form or alias.
"""

from __future__ import annotations

import ast

import pytest

from tests.architecture.test_imports import _files
from tests.conftest import REPO

_MEMOS = {"lru_cache", "cache"}


def _memo_references(tree: ast.AST) -> list[tuple[ast.expr, str]]:
    """(reference, ``lru_cache`` or ``cache``) for each use of a functools memo in ``tree``."""
    modules: set[str] = set()  # names bound to the functools module
    names: dict[str, str] = {}  # names bound to functools.lru_cache / functools.cache
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "functools"}
        elif isinstance(node, ast.ImportFrom) and node.module == "functools" and not node.level:
            names |= {a.asname or a.name: a.name for a in node.names if a.name in _MEMOS}
    found: list[tuple[ast.expr, str]] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in _MEMOS
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            found.append((node, node.attr))
        elif isinstance(node, ast.Name) and node.id in names and isinstance(node.ctx, ast.Load):
            found.append((node, names[node.id]))
    return found


def unbounded_memos(source: str, where: str = "<source>") -> list[str]:
    """``where:line what`` for each memo in ``source`` without an explicit positive bound."""
    tree = ast.parse(source, where)
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    problems = []
    for ref, kind in _memo_references(tree):
        at = f"{where}:{ref.lineno}"
        if kind == "cache":
            problems.append(f"{at} functools.cache is unbounded; use lru_cache(maxsize=N)")
            continue
        call = calls.get(id(ref))
        if call is None:
            problems.append(f"{at} lru_cache without an explicit maxsize")
            continue
        bound = next((k.value for k in call.keywords if k.arg == "maxsize"), None)
        if bound is None and call.args:
            bound = call.args[0]
        if not (
            isinstance(bound, ast.Constant)
            and isinstance(bound.value, int)
            and not isinstance(bound.value, bool)
            and bound.value > 0
        ):
            shown = "nothing" if bound is None else ast.unparse(bound)
            problems.append(f"{at} lru_cache(maxsize={shown}): give a positive integer bound")
    return problems


def test_every_memo_in_the_packages_is_bounded() -> None:
    problems = []
    for path in _files():
        problems += unbounded_memos(path.read_text(), str(path.relative_to(REPO)))
    assert problems == []


def test_some_memos_are_checked() -> None:
    """The check sees the memos that exist (a silent walker would pass everything)."""
    seen = [path for path in _files() if _memo_references(ast.parse(path.read_text(), str(path)))]
    assert any(p == REPO / "services" / "keybroker" / "ephemeral.py" for p in seen), seen


@pytest.mark.parametrize(
    "source",
    [
        "import functools\n@functools.cache\ndef f(x): ...",
        "from functools import cache\n@cache\ndef f(x): ...",
        "import functools as ft\n@ft.lru_cache(maxsize=None)\ndef f(x): ...",
        "from functools import lru_cache as memo\n@memo(None)\ndef f(x): ...",
        "from functools import lru_cache\n@lru_cache\ndef f(x): ...",
        "from functools import lru_cache\n@lru_cache()\ndef f(x): ...",
        "import functools\nSIZE = 8\n@functools.lru_cache(maxsize=SIZE)\ndef f(x): ...",
        "import functools\ng = functools.lru_cache(maxsize=0)(len)",
        "import functools\ng = functools.cache(len)",
    ],
)
def test_unbounded_or_implicit_memos_are_reported(source: str) -> None:
    assert len(unbounded_memos(source)) == 1


@pytest.mark.parametrize(
    "source",
    [
        "import functools\n@functools.lru_cache(maxsize=64)\ndef f(x): ...",
        "from functools import lru_cache\n@lru_cache(16)\ndef f(x): ...",
        "import functools\n@functools.cached_property\ndef f(self): ...",
        "cache = {}\ndef f(x): return cache.get(x)",
    ],
)
def test_bounded_memos_and_unrelated_names_pass(source: str) -> None:
    assert unbounded_memos(source) == []
