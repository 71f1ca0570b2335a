"""Helpers shared by the key-broker tests (not fixtures)."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.artifact.keybinding import bind_data_key
from strongroom.dev.softhsm import SoftHsmToken
from strongroom.keybroker import keys as keys_module
from strongroom.keybroker import p11direct
from strongroom.keybroker.errors import HsmUnavailable
from strongroom.keybroker.hsm import Hsm, HsmConfig, HsmSession
from strongroom.keybroker.keys import KeyManager
from strongroom.runtime.secrets import Secret

USER_PIN = Secret(b"user-pin-0042")
SO_PIN = Secret(b"so-pin-0042")


def make_config(token: SoftHsmToken, module: Path | None = None, **overrides: object) -> HsmConfig:
    """An HsmConfig for ``token`` (optionally through a replica module copy)."""
    values: dict[str, object] = {
        "module_path": module or token.module_path,
        "token_label": token.label,
        "pin": USER_PIN,
        "module_env": token.module_env,
        "reconnect_interval": 0.05,
    }
    values.update(overrides)
    return HsmConfig(**values)  # type: ignore[arg-type]


def spki(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> bytes:
    """DER SubjectPublicKeyInfo of a key."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ec_spki_on_an_unsupported_curve() -> bytes:
    """A well-formed EC SubjectPublicKeyInfo naming secp112r1, a curve cryptography cannot load: it
    raises UnsupportedAlgorithm, which is not a ValueError."""
    p256 = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    prime256v1, secp112r1 = bytes.fromhex("06082a8648ce3d030107"), bytes.fromhex("06052b81040006")
    body = bytearray(p256.replace(prime256v1, secp112r1, 1))
    shorter = len(prime256v1) - len(secp112r1)
    body[1] -= shorter  # the SubjectPublicKeyInfo SEQUENCE
    body[3] -= shorter  # its AlgorithmIdentifier
    return bytes(body)


def session_objects(hsm: Hsm) -> int:
    """How many session (non-token) objects exist in the backend's session: leaks show up here."""

    def op(hs: HsmSession) -> int:
        return len(list(hs.session.get_objects({Attribute.TOKEN: False})))

    return hsm.call(op, name="count session objects")


def hsm_answers_again(hsm: Hsm, timeout: float = 30.0) -> None:
    """Waits, as a readiness probe does, until ``hsm`` passes a health check: a session dropped
    twice with no operation succeeding between has the reconnects backed off meanwhile. The check
    reconnects (the next call runs at once) but does not end a run of drops in which an
    operation lost its session: the next drop is backed off again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            hsm.check_health()
            return
        except HsmUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def token_call_replaced(hsm: Hsm, name: str, replacement: Any) -> Iterator[None]:
    """The token's PKCS#11 function ``name`` answered by ``replacement`` (a ctypes callback), for
    the one-call C release (its entry point) and the calls made one at a time alike."""
    direct = hsm._direct
    assert direct is not None
    entry, single = getattr(direct.entry_points, name), getattr(direct, name)
    setattr(direct.entry_points, name, ctypes.cast(replacement, ctypes.c_void_p).value)
    setattr(direct, name, replacement)
    try:
        yield
    finally:
        setattr(direct.entry_points, name, entry)
        setattr(direct, name, single)


# Token entry points as callbacks, built from p11direct's own prototypes (a callback receives
# its buffers as addresses, passed on as they came: see test_p11direct's embedded-NUL test).
#: ``C_UnwrapKey(session, mechanism, key, wrapped, length, template, count, new key)``.
UNWRAP_KEY = p11direct._PROTOTYPES["C_UnwrapKey"]
#: ``C_WrapKey(session, mechanism, wrapping key, key, out, length in/out)``.
WRAP_KEY = p11direct._PROTOTYPES["C_WrapKey"]


@contextlib.contextmanager
def unwraps_counted(hsm: Hsm) -> Iterator[list[int]]:
    """Every ``C_UnwrapKey`` the token is asked for while inside, one-call release or single call
    alike, passed on to the token as it is; yields the list that receives each one's unwrapping
    key handle."""
    direct = hsm._direct
    assert direct is not None
    token_unwrap = UNWRAP_KEY(direct.entry_points.unwrap_key)
    calls: list[int] = []

    def unwrap(session: int, mechanism: int, key: int, *rest: Any) -> int:
        calls.append(key)
        return int(token_unwrap(session, mechanism, key, *rest))

    with token_call_replaced(hsm, "unwrap_key", UNWRAP_KEY(unwrap)):
        yield calls


def replace_keeping_mtime(path: Path, text: str) -> None:
    """Replaces ``path`` by a file with ``text`` whose mtime is the old one's (as rsync -a,
    cp -p or tar x leave it)."""
    before = os.stat(path)
    replacement = path.with_name(path.name + ".new")
    replacement.write_text(text)
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)


def release_library_stand_in(folder: Path, source: str) -> Path:
    """A stand-in for the key broker's ``_p11release`` library, compiled from the C ``source``
    with the system C compiler (as setup.py's build has it compile the real one) into ``folder``,
    under the file name ``p11direct.load_release_calls`` looks for first; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    c_file = folder / "stand_in.c"
    c_file.write_text(source)
    built = folder / f"_p11release{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    compiler = shutil.which("cc")
    assert compiler is not None, "the tests need a C compiler (cc), as the package build does"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(built), str(c_file)], check=True)
    return built


#: The model version data keys are generated for in these tests (GenerateDataKey binds the key
#: to one: artifact format 3).
MODEL = ("acme/model", "1")

#: The simulated SEV-SNP measurement the release tests' policy admits, and that policy.
MEASUREMENT = bytes.fromhex("5a" * 48)
POLICY = (
    'version: "p1"\n'
    'allowed_spiffe_ids: ["spiffe://strongroom.test/inference"]\n'
    "tee_types: [SEV_SNP]\n"
    "sev_snp:\n"
    "  allow_simulated: true\n"
    f'  measurements: ["{MEASUREMENT.hex()}"]\n'
    "  min_reported_tcb: any\n"
)


def bound(slot_key: bytes | bytearray, model: tuple[str, str] = MODEL) -> bytes:
    """The body key a publisher of ``model`` receives for ``slot_key`` (what a release unwraps)."""
    return bytes(bind_data_key(slot_key, *model))


def data_key_request(key_id: str, model: tuple[str, str] = MODEL) -> kb_pb.GenerateDataKeyRequest:
    """GenerateDataKey's request for ``key_id``, bound to ``model``."""
    return kb_pb.GenerateDataKeyRequest(key_id=key_id, model_name=model[0], model_version=model[1])


def flap_during(
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    other: KeyManager,
    key_id: str,
    version: int,
    times: int,
    *,
    reused: int | None = None,
) -> list[Any]:
    """Has ``other`` disable ``version`` and enable it again right before each of this replica's
    first ``times`` calls of ``step`` (a function of :mod:`keys`), a replica flapping the version
    while this one uses it: the enabler this replica looked up is gone each time, another in its
    place. With ``reused``, the gone enabler's handle is then pointed at that object, as a token
    that gives a destroyed object's handle to a new one leaves it (``step`` takes the version as
    its second argument). Returns the list that receives each flap's final answer."""
    real = getattr(keys_module, step)
    flaps: list[Any] = []

    def flapping(*args: Any) -> Any:
        if len(flaps) < times:
            other.disable_key(key_id, version)
            flaps.append(other.enable_key(key_id, version))
            if reused is not None:
                args[1].enablers[0].handle = reused
        return real(*args)

    monkeypatch.setattr(keys_module, step, flapping)
    return flaps
