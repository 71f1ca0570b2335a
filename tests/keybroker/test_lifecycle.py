"""KeyService: the key lifecycle as a domain, against a real SoftHSM2 token and a real audit log.

Every change is audited with who made it; a refused change writes no record; a data key whose
record cannot be written never leaves (and is wiped).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from strongroom.errors import NotFound
from strongroom.keybroker.audit import AuditLog
from strongroom.keybroker.errors import AuditUnavailable
from strongroom.keybroker.lifecycle import KeyService
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.release import Caller

ADMIN = Caller("spiffe://strongroom.test/admin", 0x1F, b"")
POLICY = (
    'version: "p1"\n'
    'allowed_spiffe_ids: ["spiffe://strongroom.test/inference"]\n'
    "tee_types: [SEV_SNP]\n"
    "sev_snp:\n"
    f'  measurements: ["{"ab" * 48}"]\n'
    "  min_reported_tcb: {bootloader: 3, tee: 0, snp: 8, microcode: 115}\n"
)


@pytest.fixture
def service(km, tmp_path):
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    yield KeyService(km, PolicyStore(tmp_path / "policies"), audit), tmp_path / "audit.log"
    audit.close()


def _records(path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_change_is_audited_with_its_caller(service) -> None:
    keys, log = service
    keys.create_key(ADMIN, "k1")
    keys.rotate_key(ADMIN, "k1")
    keys.set_policy(ADMIN, "k1", POLICY)
    keys.disable_key(ADMIN, "k1", 1)
    records = _records(log)
    assert [r["action"] for r in records] == [
        "create_key",
        "rotate_key",
        "set_release_policy",
        "disable_key",
    ]
    assert {r["caller"]["spiffe_id"] for r in records} == {ADMIN.spiffe_id}
    assert {r["caller"]["cert_serial"] for r in records} == {"1f"}
    assert [r["key"]["version"] for r in records] == [1, 2, None, 1]
    assert {r["key"]["id"] for r in records} == {"k1"}
    assert keys.policy_version("k1") == records[2]["policy_version"]


def test_a_policy_for_a_missing_key_is_refused_and_not_audited(service) -> None:
    keys, log = service
    with pytest.raises(NotFound):
        keys.set_policy(ADMIN, "nope", POLICY)
    assert not log.exists() or _records(log) == []
    assert keys.policy_version("nope") == ""


def test_a_data_key_that_cannot_be_audited_never_leaves(service, monkeypatch) -> None:
    keys, _ = service
    keys.create_key(ADMIN, "k1")
    issued = []
    real = keys._keys.generate_data_key

    def spy(key_id):
        issued.append(real(key_id))
        return issued[-1]

    monkeypatch.setattr(keys._keys, "generate_data_key", spy)

    def refuse(event):
        raise AuditUnavailable("disk full")

    monkeypatch.setattr(keys._audit, "append", refuse)
    with pytest.raises(AuditUnavailable):
        keys.generate_data_key(ADMIN, "k1")
    assert len(issued) == 1
    assert not any(issued[0].dek)  # wiped
