"""``audit verify`` and the key that signs the heads, across the files of a series.

The attacker here can write the audit volume (or the shipped copies) but does not hold the
broker's signing key: they keep the older files of a series and put in place of the newer ones a
continuation they made with the product's own writer and a key of their own, chained correctly
from the last file they kept.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.errors import DataLoss
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker.audit import AuditLog, head_path
from strongroom.keybroker.audit_head import (
    HEAD_DOMAIN,
    SLOT_BYTES,
    SLOT_STRIDE,
    Head,
    HeadFile,
    canonical_json,
    public_text,
)
from strongroom.keybroker.audit_head import parse as parse_head
from strongroom.keybroker.audit_verify import verify_audit_paths

from .test_audit import fill
from .test_audit_cli import _run
from .test_audit_rotation import RECORD


@pytest.fixture
def series(log_path: Path, key: Ed25519PrivateKey) -> Path:
    """audit.log.0-2, .3-5, .6-8 (sealed) and audit.log (9..10), signed by ``key``."""
    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as log:
        fill(log, 11)
    return log_path.parent


def _forge_after(directory: Path, kept: str, forger: Ed25519PrivateKey, scratch: Path) -> None:
    """Deletes every file of the series after ``kept`` and puts in their place a continuation
    of ``kept`` written by the broker's own code with ``forger``'s key: a first head anchored at
    ``kept``'s end (what a rotation's step 4 writes), then records, rotated as the broker
    rotates them, so that the series ends at seq 10 as before."""
    sealed = parse_head(head_path(directory / kept).read_bytes(), None).head
    for name in os.listdir(directory):
        if name.startswith("audit.log") and not name.startswith(kept):
            seq = name.removeprefix("audit.log").removeprefix(".").split("-")[0]
            if not seq or not seq[0].isdigit() or int(seq) >= sealed.count:
                (directory / name).unlink()
    scratch.mkdir()
    log = scratch / "audit.log"
    dir_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = HeadFile(
            head_path(log),
            forger,
            audit_module._key_fingerprint(forger.public_key()),
            lambda: "2026-01-01T00:00:00.000000Z",
            dir_fd,
        )
        first.read()
        first.write(Head(sealed.count, sealed.last_hash, sealed.count))
        first.close()
    finally:
        os.close(dir_fd)
    log.touch()
    with AuditLog.open(log, forger, rotate_bytes=3 * RECORD) as forged:
        fill(forged, 11 - sealed.count)
    for path in scratch.iterdir():
        shutil.copyfile(path, directory / path.name)


def _pem(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.mark.parametrize("kept", ["audit.log.3-5", "audit.log.6-8"])
def test_newest_files_replaced_under_another_key_are_tampering_without_a_public_key(
    series: Path, tmp_path: Path, kept: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The newest sealed files and the live log (or the live log alone) replaced by a
    continuation signed by another key verified intact without --public-key: nothing compared
    the key each head names across the files. The broker never changes its key within a chain
    (it does not open another key's head), so a change is tampering: SERIES_KEY_CHANGED at the
    first file signed by the other key, exit 2."""
    _forge_after(series, kept, Ed25519PrivateKey.generate(), tmp_path / "forged")
    result = verify_audit_paths([series])
    first_forged = "audit.log" if kept == "audit.log.6-8" else "audit.log.6-8"
    assert (result.intact, result.problem) == (False, "SERIES_KEY_CHANGED")
    assert (result.bad_file, result.first_seq, result.end) == (series / first_forged, 0, 11)
    assert f"{kept}'s names " in result.message and "--public-key" in result.message
    assert _run("audit", "verify", str(series)) == 2
    assert "NOT intact: SERIES_KEY_CHANGED" in capsys.readouterr().err


def test_with_the_public_key_every_head_must_be_signed_by_it(
    series: Path, key: Ed25519PrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --public-key the forged files fail on their own (each head's signature is checked
    against the given key), before the series is compared; and a series signed wholly by
    another key, which nothing in the files can tell from the broker's, too."""
    public = _pem(key, tmp_path / "audit.pub")
    _forge_after(series, "audit.log.3-5", Ed25519PrivateKey.generate(), tmp_path / "forged")
    result = verify_audit_paths([series], public_key=key.public_key())
    assert (result.problem, result.bad_file) == ("HEAD_SIGNATURE_INVALID", series / "audit.log.6-8")
    assert _run("audit", "verify", str(series), "--public-key", str(public)) == 2
    assert "HEAD_SIGNATURE_INVALID" in capsys.readouterr().err

    other = tmp_path / "other"
    other.mkdir()
    forger = Ed25519PrivateKey.generate()
    with AuditLog.open(other / "audit.log", forger, rotate_bytes=3 * RECORD) as log:
        fill(log, 11)
    assert verify_audit_paths([other]).intact  # one key throughout: only a pinned key tells
    result = verify_audit_paths([other], public_key=key.public_key())
    assert (result.problem, result.bad_file) == ("HEAD_SIGNATURE_INVALID", other / "audit.log.0-2")


def _resign(head: Path, signer: Ed25519PrivateKey, **fields: str | None) -> None:
    """Rewrites every slot of the format-2 head file ``head`` with ``fields`` set (None: left
    out) and signed with ``signer``: what anyone holding ``signer`` can write."""
    raw = bytearray(head.read_bytes())
    for offset in (0, SLOT_STRIDE):
        text = bytes(raw[offset : offset + SLOT_BYTES]).rstrip(b"\0")
        if not text:
            continue
        document = json.loads(text)
        del document["sig"]
        for name, value in fields.items():
            document.pop(name, None)
            if value is not None:
                document[name] = value
        signature = base64.b64encode(signer.sign(HEAD_DOMAIN + canonical_json(document))).decode()
        slot = canonical_json({**document, "sig": signature}) + b"\n"
        raw[offset : offset + SLOT_BYTES] = slot.ljust(SLOT_BYTES, b"\0")
    head.write_bytes(bytes(raw))


def _heads_named(directory: Path, fingerprint: str) -> list[Path]:
    return [
        path
        for path in sorted(directory.glob("audit.log*.head"))
        if parse_head(path.read_bytes(), None).key == fingerprint
    ]


@pytest.mark.parametrize("carries", ["no key", "the forger's key", "the broker's key"])
def test_a_continuation_whose_heads_name_the_brokers_key_falsely_is_tampering(
    series: Path,
    key: Ed25519PrivateKey,
    tmp_path: Path,
    carries: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A forger who wrote the broker's fingerprint as the key their heads name (it is in every
    head: public) verified intact without --public-key: only names were compared. The broker's
    heads now carry its public key, and every head of a series is checked with the key the
    first head carrying one carries, so whatever the forged heads carry they fail: none or the
    broker's key, a signature that key does not verify (HEAD_SIGNATURE_INVALID); their own, a
    key that is not the one they name (HEAD_MALFORMED). Exit 2."""
    forger = Ed25519PrivateKey.generate()
    broker = audit_module._key_fingerprint(key.public_key())
    pub = {
        "no key": None,
        "the forger's key": public_text(forger.public_key()),
        "the broker's key": public_text(key.public_key()),
    }[carries]
    _forge_after(series, "audit.log.3-5", forger, tmp_path / "forged")
    forged = _heads_named(series, audit_module._key_fingerprint(forger.public_key()))
    assert [path.name for path in forged] == ["audit.log.6-8.head", "audit.log.head"]
    for head in forged:
        _resign(head, forger, key=broker, pub=pub)
    for head in series.glob("*.head"):  # every head names the broker's key
        assert json.loads(head.read_bytes()[:SLOT_BYTES].rstrip(b"\0"))["key"] == broker
    result = verify_audit_paths([series])
    problem = "HEAD_MALFORMED" if carries == "the forger's key" else "HEAD_SIGNATURE_INVALID"
    assert (result.intact, result.problem, result.bad_file) == (
        False,
        problem,
        series / "audit.log.6-8",
    )
    if problem == "HEAD_SIGNATURE_INVALID":
        assert "audit.log.0-2's head carries that key" in result.message
    else:
        assert "its pub is not the key it names" in result.message
    assert _run("audit", "verify", str(series)) == 2
    assert f"NOT intact: {problem}" in capsys.readouterr().err


def test_a_series_from_before_heads_carried_the_key_still_verifies(
    series: Path, key: Ed25519PrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Heads written before they carried the key (``pub``), by an older release, beside heads
    that carry it, in either order (an upgrade, a downgrade): one key signed them all, so the
    series is intact, its heads checked with the key the first carrier carries; with none
    carrying it, the summary names the key the heads name, as before."""
    fingerprint = audit_module._key_fingerprint(key.public_key())
    for old in ("audit.log.0-2.head", "audit.log.3-5.head"):
        _resign(series / old, key, pub=None)  # as an older release wrote them
    assert _run("audit", "verify", str(series)) == 0
    out = capsys.readouterr().out
    assert f"head signatures valid with the key a head carries, {fingerprint}" in out
    assert "which only --public-key proves the broker's" in out
    assert verify_audit_paths([series], public_key=key.public_key()).intact
    archive = tmp_path / "archive"  # the older files shipped apart from the live ones
    archive.mkdir()
    for name in ("audit.log.0-2", "audit.log.0-2.head", "audit.log.3-5", "audit.log.3-5.head"):
        shutil.move(series / name, archive / name)
    assert verify_audit_paths([archive, series]).intact
    for path in list(archive.iterdir()):
        shutil.move(path, series / path.name)

    _resign(series / "audit.log.head", key, pub=None)  # a downgrade: the newest lack it
    assert verify_audit_paths([series]).intact

    for head in series.glob("*.head"):
        _resign(head, key, pub=None)
    assert _run("audit", "verify", str(series)) == 0
    out = capsys.readouterr().out
    assert "head signatures NOT checked" in out
    assert f"every head names key {fingerprint[:16]}" in out


def test_changing_the_audit_key_starts_a_new_chain(
    series: Path, log_path: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """deploy/README's way to change the audit key (replace it, restart the broker) left a
    broker that does not start: it opens no head another key signed. Changing it starts a new
    chain once the old series is archived; the two verify apart, each with its own key, and
    are not one series."""
    new = Ed25519PrivateKey.generate()
    with pytest.raises(DataLoss, match="not signed by this broker's key") as info:
        AuditLog.open(log_path, new)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    archive = tmp_path / "archive"
    archive.mkdir()
    for path in list(series.iterdir()):
        shutil.move(path, archive / path.name)
    with AuditLog.open(log_path, new) as log:
        fill(log, 2)
    assert verify_audit_paths([archive], public_key=key.public_key()).intact
    assert verify_audit_paths([series], public_key=new.public_key()).intact
    assert verify_audit_paths([archive, series]).problem == "SERIES_OVERLAP"


@pytest.mark.parametrize("carries", ["no key", "the forger's key", "the broker's key"])
def test_a_continuation_of_heads_from_before_they_carried_the_key(
    series: Path, key: Ed25519PrivateKey, tmp_path: Path, carries: str
) -> None:
    """The files kept were written before heads carried the key (an older release), and the
    forged continuation names the broker's key. Carrying a key, its first forged file is the
    one blamed: the broker's key does not verify its head, and another key is not the one it
    names (were that not checked, the other key would be the series' and the broker's own
    older heads the ones blamed). Carrying none, names alone are compared and it verifies: the
    limit README item 54 states, which only --public-key closes."""
    forger = Ed25519PrivateKey.generate()
    broker = audit_module._key_fingerprint(key.public_key())
    for old in ("audit.log.0-2.head", "audit.log.3-5.head"):
        _resign(series / old, key, pub=None)
    _forge_after(series, "audit.log.3-5", forger, tmp_path / "forged")
    pub = {
        "no key": None,
        "the forger's key": public_text(forger.public_key()),
        "the broker's key": public_text(key.public_key()),
    }[carries]
    for head in _heads_named(series, audit_module._key_fingerprint(forger.public_key())):
        _resign(head, forger, key=broker, pub=pub)
    result = verify_audit_paths([series])
    if carries == "no key":
        assert result.intact and "every head names key" in result.message
        assert verify_audit_paths([series], public_key=key.public_key()).problem == (
            "HEAD_SIGNATURE_INVALID"
        )
        return
    problem = "HEAD_MALFORMED" if carries == "the forger's key" else "HEAD_SIGNATURE_INVALID"
    assert (result.intact, result.problem, result.bad_file) == (
        False,
        problem,
        series / "audit.log.6-8",
    )
