"""Signal handlers are installed only through :mod:`strongroom.runtime.signals`.

``run_service`` gives back the handlers a service took when it ends (a library must not change
its host process for good), and ``strongroom serve`` keeps them to its exit: both rules hold only
for handlers installed through ``signals.install``, which records what it replaced. A
``signal.signal(...)`` anywhere else in the shipped packages would never be put back. Left out:
the dev demo (``dev/demo.py``), which restores its own, and ``strongroom pki serve``
(``pki/cli.py``), step-ca's supervisor, whose process ends with step-ca (``strongroom.pki`` may not
import the runtime; its tests run it in a process of its own).

The check is on the syntax tree of every Python file of every package, through any import form.
"""

from __future__ import annotations

import ast

from tests.architecture.test_imports import _files
from tests.conftest import REPO

_ALLOWED = {"strongroom/runtime/signals.py", "dev/demo.py", "pki/cli.py"}


def signal_installs(source: str, where: str = "<source>") -> list[str]:
    """``where:line`` for each call of ``signal.signal`` (or ``signal`` imported from it)."""
    tree = ast.parse(source, where)
    modules: set[str] = set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "signal"}
        elif isinstance(node, ast.ImportFrom) and node.module == "signal" and not node.level:
            names |= {a.asname or a.name for a in node.names if a.name == "signal"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "signal"
            and isinstance(func.value, ast.Name)
            and func.value.id in modules
        ) or (isinstance(func, ast.Name) and func.id in names):
            found.append(f"{where}:{node.lineno}")
    return found


def test_handlers_are_installed_only_through_the_runtime_s_signals_module() -> None:
    found = []
    for path in _files():
        where = str(path.relative_to(REPO))
        if where not in _ALLOWED:
            found += signal_installs(path.read_text(), where)
    assert found == [], "install handlers with strongroom.runtime.signals.install"


def test_every_form_of_the_call_is_found() -> None:
    sources = [
        "import signal\nsignal.signal(signal.SIGTERM, print)\n",
        "import signal as s\ns.signal(15, print)\n",
        "from signal import signal\nsignal(15, print)\n",
        "from signal import signal as on\non(15, print)\n",
    ]
    assert [signal_installs(s) for s in sources] == [["<source>:2"]] * 4
    assert signal_installs("import signal\nsignal.getsignal(15)\n") == []
