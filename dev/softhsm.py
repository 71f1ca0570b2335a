"""SoftHSM2 tokens for development, tests and the demo (never for production keys).

:func:`init_softhsm_token` makes a self-contained token directory::

    DIR/softhsm2.conf     points SoftHSM2 at DIR/tokens
    DIR/tokens/<uuid>/    the token's object files
    DIR/libsofthsm2.so    a private copy of the PKCS#11 module (see below)

**PINs never appear on a command line.** ``softhsm2-util --init-token`` takes PINs either from
``--pin``/``--so-pin`` (visible in ``ps``) or from a prompt that it reads from a *terminal* only:
it calls ``tcgetattr`` on stdin and gives up ("Could not get SO PIN") when stdin is a pipe. So the
tool is run on a pseudo-terminal and each PIN is typed at its prompt. The tool turns echo off before
reading, and the captured output is scrubbed of the PINs anyway before it is used in an error.

**Why a private module copy.** SoftHSM2 reads ``SOFTHSM2_CONF`` once, in ``C_Initialize``, and keeps
one global state per loaded library: a process that has loaded ``libsofthsm2.so`` does not see tokens
created later by another process, and a second ``C_Initialize`` with another configuration is
impossible while the first one is in use. Loading a *copy* of the module from a different path gives
an independent library instance (its own globals and its own ``C_Initialize``), so every test owns an
independent HSM with its own token and configuration, in one pytest process, without
``C_Finalize``-ing anyone else's module. :meth:`SoftHsmToken.replica_module` makes further copies
that open the *same* token, which is how tests model several broker replicas sharing one HSM.

The configuration reaches the module through :attr:`SoftHsmToken.module_env`, which
:class:`~strongroom.keybroker.hsm.HsmConfig` applies around ``C_Initialize`` only.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.runtime.secrets import Secret

#: Where Debian's ``softhsm2`` package installs the module (a symlink into the multiarch dir).
SYSTEM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
SOFTHSM2_UTIL = "softhsm2-util"

_LABEL_RE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,30}[\x21-\x7e])?$")
_MIN_PIN, _MAX_PIN = 4, 255
_PROMPTS = (
    (b"Please enter SO PIN: ", "so"),
    (b"Please reenter SO PIN: ", "so"),
    (b"Please enter user PIN: ", "user"),
    (b"Please reenter user PIN: ", "user"),
)


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised SoftHSM2 token that lives entirely inside :attr:`directory`."""

    directory: Path
    conf_path: Path
    module_path: Path
    label: str

    @property
    def tokens_dir(self) -> Path:
        """The ``directories.tokendir`` of :attr:`conf_path`."""
        return self.directory / "tokens"

    @property
    def module_env(self) -> dict[str, str]:
        """The environment the module must see when it is initialised."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}

    def token_store(self) -> Path:
        """The directory holding this token's object files (``tokens/<uuid>``).

        Tests move it away and back to make the token disappear and return.
        """
        stores = [p for p in self.tokens_dir.iterdir() if p.is_dir()]
        if len(stores) != 1:
            raise FailedPrecondition(
                f"expected one token store in {self.tokens_dir}, found {len(stores)}",
                reason="SOFTHSM_LAYOUT",
            )
        return stores[0]

    def replica_module(self, name: str) -> Path:
        """Another private copy of the module, opening the same token as an independent instance.

        Two :class:`~strongroom.keybroker.hsm.Hsm` objects built from two copies behave like two
        broker processes sharing one HSM.
        """
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", name):
            raise InvalidArgument(f"replica name {name!r} is not [a-z0-9-]", reason="INVALID_NAME")
        path = self.directory / f"libsofthsm2-{name}.so"
        if not path.exists():
            shutil.copyfile(self.module_path, path)
        return path


def init_softhsm_token(
    directory: Path | str,
    *,
    label: str,
    pin: Secret,
    so_pin: Secret,
    system_module: Path = SYSTEM_MODULE,
    timeout: float = 30.0,
) -> SoftHsmToken:
    """Creates ``directory`` (which must not exist or be empty) holding one initialised token.

    ``label`` is the token label (1-32 printable ASCII characters). The user PIN is set, so the
    token is ready for :class:`~strongroom.keybroker.hsm.Hsm`. Raises ``FailedPrecondition`` with
    ``SOFTHSM_NOT_INSTALLED`` when SoftHSM2 is missing and ``SOFTHSM_INIT_FAILED`` when the tool fails.
    """
    directory = Path(directory)
    if not _LABEL_RE.match(label):
        raise InvalidArgument(
            "a token label is 1-32 printable ASCII characters without leading or trailing spaces",
            reason="TOKEN_LABEL_INVALID",
        )
    pins = {"so": so_pin.reveal_text(), "user": pin.reveal_text()}
    for kind, value in pins.items():
        if not _MIN_PIN <= len(value.encode()) <= _MAX_PIN or "\n" in value or "\r" in value:
            raise InvalidArgument(
                f"the {kind} PIN must be {_MIN_PIN}-{_MAX_PIN} bytes on one line",
                reason="PIN_INVALID",
            )
    util = shutil.which(SOFTHSM2_UTIL)
    if util is None or not system_module.exists():
        raise FailedPrecondition(
            "SoftHSM2 is not installed (Debian package softhsm2)", reason="SOFTHSM_NOT_INSTALLED"
        )
    if directory.exists() and any(directory.iterdir()):
        raise FailedPrecondition(f"{directory} is not empty", reason="SOFTHSM_DIR_NOT_EMPTY")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
        "slots.mechanisms = ALL\n"
    )
    module = directory / "libsofthsm2.so"
    shutil.copyfile(system_module.resolve(), module)
    _run_init_token(util, conf, label, pins, timeout)
    return SoftHsmToken(directory=directory, conf_path=conf, module_path=module, label=label)


def _run_init_token(
    util: str, conf: Path, label: str, pins: dict[str, str], timeout: float
) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SOFTHSM2_CONF": str(conf),
        "LC_ALL": "C",
    }
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [util, "--init-token", "--free", "--label", label],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            close_fds=True,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    output = bytearray()
    try:
        output = _answer_prompts(master, pins, time.monotonic() + timeout)
        rc = proc.wait(timeout=max(0.1, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = -1
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = output.decode("utf-8", "replace")
    for value in pins.values():
        text = text.replace(value, "***")
    if rc != 0 or "has been initialized" not in text:
        last = " / ".join(line.strip() for line in text.splitlines() if line.strip())[-300:]
        raise FailedPrecondition(
            f"softhsm2-util --init-token failed (exit {rc}): {last}", reason="SOFTHSM_INIT_FAILED"
        )


def _answer_prompts(master: int, pins: dict[str, str], deadline: float) -> bytearray:
    """Reads the tool's terminal output and types each PIN at its prompt."""
    output = bytearray()
    pending = bytearray()
    step = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise subprocess.TimeoutExpired(SOFTHSM2_UTIL, 0)
        ready, _, _ = select.select([master], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            return output
        if not chunk:
            return output
        output += chunk
        pending += chunk
        while step < len(_PROMPTS) and _PROMPTS[step][0] in pending:
            prompt, kind = _PROMPTS[step]
            del pending[: pending.index(prompt) + len(prompt)]
            with contextlib.suppress(OSError):
                os.write(master, pins[kind].encode() + b"\n")
            step += 1
