"""A replica reloading the collateral cache while another process writes it.

A document and its issuer chain are two files, replaced one after the other under the writers'
lock. A reader that reloaded without that lock could read the old document and then the new
chain (Intel or AMD having re-issued their signing certificate), find the signature did not
verify, and skip the document: ``COLLATERAL_MISSING`` for every release until its next reload.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom import files
from strongroom.attestation import collateral_cache
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.errors import CollateralUnavailable
from strongroom.attestation.trust import TrustStore
from strongroom.dev.simulated import SimulatedAuthority, _cert, _name
from tests.keybroker.test_audit_dirlock import _held, _within_test_wait
from tests.keybroker.test_audit_reader import _NoSharedLocks


def _with_new_tcb_signer(authority: SimulatedAuthority, now: dt.datetime) -> SimulatedAuthority:
    """The same authority after Intel re-issued its TCB signing certificate (a new key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(
        _name("Intel SGX TCB Signing"),
        authority.intel_root.subject,
        key.public_key(),
        authority.intel_root_key,
        now,
        ca=False,
    )
    return dataclasses.replace(authority, tcb_signing_key=key, tcb_signing=cert)


def test_a_reload_never_pairs_a_document_with_another_writes_chain(
    authority: SimulatedAuthority,
    sim_trust: TrustStore,
    now: dt.datetime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = authority.tdx(now=now), authority.tdx(now=now)
    new = dataclasses.replace(new, authority=_with_new_tcb_signer(authority, now))
    writer = CollateralCache(tmp_path, sim_trust)
    writer.put_tdx_tcb_info(
        old.tcb_info(now=now, evaluation_number=17), authority.tcb_signing_chain_pem()
    )
    replica = CollateralCache(tmp_path, sim_trust, writable=False)

    # The replica's reload stops right after it has read the TCB info document...
    read_document, resume = threading.Event(), threading.Event()
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        data = real_read(path)
        if threading.current_thread() is reload_thread and path.suffix == ".json":
            read_document.set()
            assert resume.wait(30)
        return data

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    reload_thread = threading.Thread(target=replica._load)
    reload_thread.start()
    assert read_document.wait(30)
    # ...while the writer replaces the chain and the document (re-issued signing certificate).
    write = threading.Thread(
        target=writer.put_tdx_tcb_info,
        args=(
            new.tcb_info(now=now, evaluation_number=18),
            new.authority.tcb_signing_chain_pem(),
        ),
    )
    write.start()
    write.join(1.0)  # with the readers' lock the writer waits for the reload: that is the point
    resume.set()
    reload_thread.join(30)
    write.join(30)
    assert not write.is_alive() and not reload_thread.is_alive()
    held: Any = replica._tcb.get(bytes(old.fmspc))
    assert held is not None, "the reload skipped a valid TCB info it read beside the new chain"
    assert held[1].tcb_evaluation_data_number in (17, 18)


def _cached(
    authority: SimulatedAuthority, sim_trust: TrustStore, now: dt.datetime, directory: Path
) -> tuple[CollateralCache, bytes]:
    """A cache holding one TCB info (written, so ``.lock`` exists) and that document's FMSPC."""
    tdx = authority.tdx(now=now)
    writer = CollateralCache(directory, sim_trust)
    writer.put_tdx_tcb_info(
        tdx.tcb_info(now=now, evaluation_number=17), authority.tcb_signing_chain_pem()
    )
    return writer, bytes(tdx.fmspc)


def _replica(directory: Path, sim_trust: TrustStore) -> CollateralCache:
    """A read-only replica of the cache in ``directory`` that checks for a reload at every use."""
    return CollateralCache(directory, sim_trust, writable=False, reload_interval=0)


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[CollateralCache]:
    """Each cache's reads of its files from now on (``_read_all``), in order: the list fills as
    they happen."""
    reads: list[CollateralCache] = []
    real_read_all = CollateralCache._read_all

    def read_all(cache: CollateralCache) -> None:
        reads.append(cache)
        real_read_all(cache)

    monkeypatch.setattr(CollateralCache, "_read_all", read_all)
    return reads


@contextmanager
def _loaded_while_locked(
    authority: SimulatedAuthority,
    sim_trust: TrustStore,
    now: dt.datetime,
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[CollateralCache, bytes, Path]]:
    """A replica of a cache in ``directory`` (:func:`_cached`) loaded while another process
    holds its ``.lock`` (LOCK_WAIT_SECONDS 0.2 s), the cached FMSPC and the lock's path; the lock
    is held until the block ends."""
    monkeypatch.setattr(collateral_cache, "LOCK_WAIT_SECONDS", 0.2)
    _, fmspc = _cached(authority, sim_trust, now, directory)
    lock = directory / ".lock"
    with _held(lock):
        yield _within_test_wait(lambda: _replica(directory, sim_trust)), fmspc, lock


def test_a_reload_does_not_wait_for_ever_for_a_held_lock(
    authority: SimulatedAuthority,
    sim_trust: TrustStore,
    now: dt.datetime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any process that can open ``.lock`` (read access is enough for a flock) held every
    reload, and with it every release that needed collateral, for as long as it liked. Past
    LOCK_WAIT_SECONDS the reload reads without it, as where there is no lock file, logged at
    ERROR naming it: a holder that is no writer keeps every writer out, so the files hold one
    write; what a stuck writer left half-replaced fails its checks and is refused as an
    unreadable file is. The next check reloads again (the read was not under the lock)."""
    with _loaded_while_locked(authority, sim_trust, now, tmp_path, monkeypatch) as (
        replica,
        fmspc,
        lock,
    ):
        assert replica._tcb.get(fmspc) is not None
        [logged] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert f"{lock} is locked by another process" in logged.getMessage()
        assert "fuser" in logged.getMessage()
        reads = _reads(monkeypatch)
        _within_test_wait(lambda: replica.tdx_tcb_info(fmspc))
        assert reads, "not read again after a read made without the lock"
    reads.clear()
    replica.tdx_tcb_info(fmspc)  # read under the lock: the generation alone decides again
    replica.tdx_tcb_info(fmspc)
    assert len(reads) == 1


def test_each_reload_that_waited_out_a_held_lock_is_logged(
    authority: SimulatedAuthority,
    sim_trust: TrustStore,
    now: dt.datetime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload whose lock another process holds waits LOCK_WAIT_SECONDS (5 s) first, inside
    the release that checked, and does so again at each check while the holder holds it. The
    ERROR saying so was made once-only with a flock that fails (569a276), which costs no wait:
    a lock held for good then stalled a release every reload without a word after the first.
    Each reload that waited is logged (a flock that fails, once)."""
    with _loaded_while_locked(authority, sim_trust, now, tmp_path, monkeypatch) as (
        replica,
        fmspc,
        lock,
    ):
        for _ in range(2):
            _within_test_wait(lambda: replica.tdx_tcb_info(fmspc))
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.name == collateral_cache.__name__ and r.levelno == logging.ERROR
    ]
    assert len(errors) == 3, errors
    assert all(f"{lock} is locked by another process" in m for m in errors), errors


def test_a_reload_whose_lock_fails_is_logged_and_made_again(
    authority: SimulatedAuthority,
    sim_trust: TrustStore,
    now: dt.datetime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """flock failing on ``.lock`` (refused, not held: ENOLCK) let the reload read as if it held
    the lock, silently, and trust that read until the generation changed. It is now read as when
    the lock is held: logged at ERROR naming the file and the error, and read again next check."""
    _, fmspc = _cached(authority, sim_trust, now, tmp_path)
    monkeypatch.setattr(files, "fcntl", _NoSharedLocks())
    replica = _replica(tmp_path, sim_trust)
    assert replica._tcb.get(fmspc) is not None
    [logged] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"cannot lock the collateral cache's lock file {tmp_path / '.lock'}" in (
        logged.getMessage()
    )
    assert os.strerror(errno.ENOLCK) in logged.getMessage()
    reads = _reads(monkeypatch)
    replica.tdx_tcb_info(fmspc)
    assert reads, "not read again after a read made without the lock"


def test_a_lock_that_always_fails_is_logged_once_and_again_when_that_changes(
    authority: SimulatedAuthority,
    sim_trust: TrustStore,
    now: dt.datetime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a file system whose flock always fails, every reload (each check: every 2 s by
    default, as it read without the lock) logged the same ERROR. It is logged once now, the
    reloads going on as before; the lock working again is one INFO line, and failing after that
    is logged again."""
    writer, fmspc = _cached(authority, sim_trust, now, tmp_path)
    reads = _reads(monkeypatch)

    def read_by_replica() -> int:
        return sum(cache is not writer for cache in reads)

    def logged() -> list[tuple[int, str]]:
        return [
            (r.levelno, r.getMessage())
            for r in caplog.records
            if r.name == collateral_cache.__name__ and r.levelno >= logging.INFO
        ]

    failed = f"cannot lock the collateral cache's lock file {tmp_path / '.lock'}: flock failed: "
    with caplog.at_level(logging.INFO, logger=collateral_cache.__name__):
        with monkeypatch.context() as refusing:
            refusing.setattr(files, "fcntl", _NoSharedLocks())
            replica = _replica(tmp_path, sim_trust)
            for _ in range(3):
                assert replica.tdx_tcb_info(fmspc) is not None
        assert read_by_replica() == 4  # read at each check, without the lock
        [(level, message)] = logged()
        assert level == logging.ERROR and message.startswith(failed), message
        assert os.strerror(errno.ENOLCK) in message
        replica.tdx_tcb_info(fmspc)  # flock works again: read under it
        replica.tdx_tcb_info(fmspc)  # the generation alone decides again: not read
        assert read_by_replica() == 5
        assert logged()[1:] == [
            (logging.INFO, f"the collateral cache's lock file {tmp_path / '.lock'} locks again")
        ]
        with monkeypatch.context() as refusing:
            refusing.setattr(files, "fcntl", _NoSharedLocks())
            newer = authority.tdx(now=now).tcb_info(now=now, evaluation_number=18)
            writer.put_tdx_tcb_info(newer, authority.tcb_signing_chain_pem())  # exclusive: works
            replica.tdx_tcb_info(fmspc)  # a new generation: reloaded, without the lock
            replica.tdx_tcb_info(fmspc)  # and again at the next check
        assert read_by_replica() == 7
        errors = [m for level, m in logged() if level == logging.ERROR]
        assert len(errors) == 2 and errors[1].startswith(failed), errors


def test_a_write_does_not_wait_for_ever_for_a_held_lock(
    authority: SimulatedAuthority,
    sim_trust: TrustStore,
    now: dt.datetime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write (a fetched VCEK or TCB info stored in a release, an import) waited for ever
    too. Past the bound it is refused as a write to a full or read-only volume is
    (COLLATERAL_STORE_FAILED, naming the lock file), nothing stored; the holder gone, it
    is stored."""
    monkeypatch.setattr(collateral_cache, "LOCK_WAIT_SECONDS", 0.2)
    writer, fmspc = _cached(authority, sim_trust, now, tmp_path)
    tdx = authority.tdx(now=now)
    newer = tdx.tcb_info(now=now, evaluation_number=18)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    with _held(tmp_path / ".lock", "LOCK_SH"), pytest.raises(CollateralUnavailable) as refused:
        _within_test_wait(lambda: writer.put_tdx_tcb_info(newer, authority.tcb_signing_chain_pem()))
    assert refused.value.reason == "COLLATERAL_STORE_FAILED"
    assert f"{tmp_path / '.lock'} is locked by another process" in refused.value.message
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    writer.put_tdx_tcb_info(newer, authority.tcb_signing_chain_pem())
    held: Any = writer._tcb[fmspc]
    assert held[1].tcb_evaluation_data_number == 18
