"""Every per-caller budget and limit asks one rule which bucket a caller is in.

The rule is :func:`strongroom.runtime.callers.bucket` (a caller's verified SPIFFE ID; every caller
without a role or without a usable certificate in :data:`~strongroom.runtime.callers.ROLELESS`),
applied to an RPC by :func:`~strongroom.runtime.callers.caller_key` or the host's ``identify``,
and beneath it, per certificate, :func:`~strongroom.runtime.callers.certificate_bucket`. Budgets
that answered the question their own way disagreed: the key broker's audit budget gave each
role-less identity a budget of its own while the limits counted them as one, and the refusal log
lines did the same.

A grep cannot tell what a key means, so this test makes the question impossible to skip: every
module of the shipped packages that builds a per-caller budget (a ``CallerBuckets``, a
``RefusalRecords``) or a ``Counter[str]`` is listed in :data:`KEYED_BY` with the helper of
``strongroom.runtime.callers`` it keys callers by, which it must import; a new one fails here
until its author has said how it keys callers. And outside ``callers.py`` nothing spells a bucket
of its own: no constant naming callers without an identity, no key joining a SPIFFE ID and a
serial.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.architecture.test_imports import _files
from tests.conftest import REPO

RULES = "strongroom/runtime/callers.py"
_BUDGETS = {"CallerBuckets", "RefusalRecords"}

KEYED_BY: dict[str, tuple[str, ...]] = {
    # The limits themselves: per identity, by the host's identify (caller_key by default).
    RULES: ("bucket",),
    "strongroom/runtime/streams.py": ("caller_key", "Identify", "certificate_key", "Certify"),
    # Refusal lines: the call's caller by its host's identify (enter_rpc), caller_key otherwise.
    "strongroom/runtime/log_refusals.py": ("caller_key", "Identify"),
    # GetEvidence: only callers with a role reach it (the authoriser refused the rest first).
    "services/inference/evidence_service.py": ("caller_key",),
    # Each caller's share of the response memory: keyed by its user, the servicer (caller_key).
    "services/inference/oip/_budget.py": (),
    # The broker's: per certificate beneath the SPIFFE ID of a caller the authoriser admitted.
    "services/keybroker/fetch_budget.py": ("certificate_bucket",),
    "services/keybroker/unwrap_first.py": ("certificate_bucket",),
    "services/keybroker/grant_budget.py": ("certificate_bucket",),
    # Keys given by its users (below): the runtime's bucket, or an admitted caller's SPIFFE ID.
    "services/keybroker/refusals.py": (),
    # deny_unread: the bucket the runtime's refusal observer is told; the rest: admitted callers.
    "services/keybroker/release.py": (),
    # GenerateDataKey, ReWrap: callers the authoriser admitted, by their SPIFFE ID.
    "services/keybroker/lifecycle.py": (),
    # Not callers: the signing key ids of an audit log's records, a re-wrap run's outcomes, the
    # key versions whose state moved under operations (a line budget per version).
    "services/keybroker/audit_verify.py": (),
    "services/keybroker/state_lines.py": (),
    "strongroom/cli/keys.py": (),
}
"""Module (repository path) -> the helpers of ``strongroom.runtime.callers`` it must import to
key callers; empty where its keys come from elsewhere (said beside it)."""


def _budget_sites(tree: ast.AST) -> list[int]:
    """Lines building a per-caller budget or declaring a ``Counter[str]``."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if isinstance(node.func, ast.Attribute):
                name = node.func.attr
            if name in _BUDGETS:
                lines.append(node.lineno)
        elif isinstance(node, ast.AnnAssign) and re.fullmatch(
            r"(collections\.)?Counter\[str\]", ast.unparse(node.annotation)
        ):
            lines.append(node.lineno)
    return lines


def _imported_from_callers(tree: ast.AST) -> set[str]:
    return {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "strongroom.runtime.callers"
        for alias in node.names
    }


def _relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_every_per_caller_budget_says_how_it_keys_callers() -> None:
    """A module building a budget or a per-key counter that is not in KEYED_BY fails: add it,
    keyed by ``strongroom.runtime.callers`` (``caller_key``/the host's ``identify`` for an RPC's
    caller, ``bucket``, ``certificate_bucket``), never by a rule of its own."""
    found = {
        _relative(path)
        for path in _files()
        if _budget_sites(ast.parse(path.read_text(), str(path)))
    }
    assert found - KEYED_BY.keys() == set(), (
        "per-caller budgets not in KEYED_BY: key their callers with strongroom.runtime.callers "
        "(one rule for every budget) and list them"
    )
    assert KEYED_BY.keys() - found == set(), "KEYED_BY lists modules without a budget any more"


def test_each_budget_imports_the_rule_it_keys_by() -> None:
    missing = {
        module: sorted(
            set(helpers) - _imported_from_callers(ast.parse((REPO / module).read_text()))
        )
        for module, helpers in KEYED_BY.items()
        if module != RULES
    }
    assert {m: h for m, h in missing.items() if h} == {}


_OWN_BUCKETS = [
    # A key joining a SPIFFE ID and a certificate serial: certificate_bucket's.
    re.compile(r"""f["']\{[^}]*spiffe_id[^}]*\}\W?\{[^}]*serial[^}]*\}["']"""),
    # A caller's SPIFFE ID or a stand-in when it has none: bucket's (ROLELESS).
    re.compile(r"\.spiffe_id\s+if\s+\w+\s+is\s+not\s+None\s+else\b"),
    # Another name for callers without an identity or a role.
    re.compile(r"""["'](unverified|roleless|role-less|anonymous)(-[a-z]+)*["']"""),
]


def test_no_module_but_the_rules_spells_a_bucket_of_its_own() -> None:
    """The broker's audit budget keyed unusable certificates on a name of its own
    (``unverified-certificate``) and role-less callers on their SPIFFE IDs, and unwrap_first
    joined SPIFFE ID and serial itself: such keys live in strongroom/runtime/callers.py only."""
    spelled = [
        f"{_relative(path)}:{number}: {line.strip()}"
        for path in _files()
        if _relative(path) != RULES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(pattern.search(line) for pattern in _OWN_BUCKETS)
    ]
    assert spelled == []


def test_the_patterns_find_what_they_are_for() -> None:
    """The old code's keys, as they were written, are found (the test is not vacuous)."""
    old = [
        "who = caller.spiffe_id if caller is not None else UNVERIFIED",
        'UNVERIFIED = "unverified-certificate"',
        '        return f"{spiffe_id} {serial}"',
    ]
    assert all(any(p.search(line) for p in _OWN_BUCKETS) for line in old)
    tree = ast.parse("self._b = CallerBuckets(1.0, 2)\nx: Counter[str] = Counter()\n")
    assert sorted(_budget_sites(tree)) == [1, 2]
