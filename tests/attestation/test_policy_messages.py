"""Policy load errors name the field path and what is wrong, with the reason code.

The sections are pydantic models; this pins the translation of their errors
(``strongroom.attestation.rules.schema.load``) so that no pydantic wording or error type leaks.
"""

from __future__ import annotations

import json

import pytest

from strongroom.attestation.errors import PolicyInvalid
from strongroom.attestation.policy import ReleasePolicy
from strongroom.reasons import Reason

M = "00" * 48
ZERO = {"fmc": 0, "bootloader": 0, "tee": 0, "snp": 0, "microcode": 0}


def _doc(**changes: object) -> str:
    doc: dict[str, object] = {
        "version": "1",
        "allowed_spiffe_ids": ["spiffe://a/b"],
        "tee_types": ["SEV_SNP", "TDX"],
        "sev_snp": {"measurements": [M], "min_reported_tcb": ZERO},
        "tdx": {"mrtds": [M]},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            doc[section][field] = value  # type: ignore[index]
        elif value is ...:
            doc.pop(section)
        else:
            doc[section] = value
    return json.dumps(doc)


CASES = [
    (_doc(tdx__mrtds=[M, 3]), Reason.POLICY_BAD_HEX,
     "tdx.mrtds: entries must be 96 hex characters (48 bytes)"),
    (_doc(tdx__rtmr1=None), Reason.POLICY_BAD_TYPE, "tdx.rtmr1: must be a list"),
    (_doc(tdx__fmspcs=[]), Reason.POLICY_EMPTY_ALLOW_LIST,
     "tdx.fmspcs: is an empty allow-list, which would allow nothing; remove it or list values"),
    (_doc(tdx__mrtd=1), Reason.POLICY_UNKNOWN_KEY, "tdx.mrtd: is not a known key"),
    (_doc(tdx__allow_debug=None), Reason.POLICY_BAD_TYPE, "tdx.allow_debug: must be true or false"),
    (_doc(tdx__min_tcb_evaluation_data_number=True), Reason.POLICY_BAD_VALUE,
     "tdx.min_tcb_evaluation_data_number: must be an integer 0..4294967295"),
    (_doc(tdx__min_tcb_evaluation_data_number="3"), Reason.POLICY_BAD_VALUE,
     "tdx.min_tcb_evaluation_data_number: must be an integer 0..4294967295"),
    (_doc(tdx=None), Reason.POLICY_BAD_TYPE, "tdx: must be a mapping"),
    (_doc(sev_snp__products=["Rome"]), Reason.POLICY_BAD_VALUE,
     "sev_snp.products: 'Rome' is not one of ['Milan', 'Genoa', 'Turin']"),
    (_doc(sev_snp__min_reported_tcb={"snp": 3, "ucode": 1}), Reason.POLICY_UNKNOWN_KEY,
     "sev_snp.min_reported_tcb.ucode: is not a known key"),
    (_doc(sev_snp__min_reported_tcb={"snp": 3}), Reason.POLICY_MISSING_KEY,
     "sev_snp.min_reported_tcb.bootloader: is required"),
    (_doc(sev_snp__min_reported_tcb={**ZERO, "fmc": None}), Reason.POLICY_BAD_VALUE,
     "sev_snp.min_reported_tcb.fmc: must be an integer 0..255"),
    (_doc(sev_snp__min_reported_tcb=None), Reason.POLICY_BAD_TYPE,
     'sev_snp.min_reported_tcb: must be a mapping or "any"'),
    (_doc(sev_snp__min_reported_tcb="any"), Reason.POLICY_BAD_VALUE,
     'sev_snp.min_reported_tcb: "any" is only allowed in development mode'),
    (_doc(version=...), Reason.POLICY_MISSING_KEY, "version: is required"),
    (_doc(description=3), Reason.POLICY_BAD_TYPE, "description: must be a string"),
    (_doc(allowed_spiffe_ids=["https://x"]), Reason.POLICY_BAD_VALUE,
     "allowed_spiffe_ids: 'https://x' is not a SPIFFE ID"),
    (_doc(tee_types=["SGX"]), Reason.POLICY_BAD_VALUE,
     "tee_types: 'SGX' is not one of ['SEV_SNP', 'TDX']"),
    ("[]", Reason.POLICY_BAD_TYPE, "document: must be a mapping"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "reason", "message"), CASES)
def test_load_error_names_the_field(text: str, reason: str, message: str) -> None:
    with pytest.raises(PolicyInvalid) as err:
        ReleasePolicy.load(text)
    assert (err.value.reason, err.value.message) == (reason, f"policy {message}")


def test_loaded_sections_are_immutable() -> None:
    from pydantic import ValidationError

    from strongroom.attestation.evidence import TeeType

    rules = ReleasePolicy.load(_doc()).rules[TeeType.TDX]
    with pytest.raises(ValidationError):
        rules.allow_debug = True  # type: ignore[misc]
