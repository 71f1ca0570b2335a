"""A replica reloading the collateral cache while another process writes it.

A document and its issuer chain are two files, replaced one after the other under the writers'
lock. A reader that reloaded without that lock could read the old document and then the new
chain (Intel or AMD having re-issued their signing certificate), find the signature did not
verify, and skip the document: ``COLLATERAL_MISSING`` for every release until its next reload.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.trust import TrustStore
from strongroom.dev.simulated import SimulatedAuthority, _cert, _name


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
