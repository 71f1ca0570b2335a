"""One rule for whose fault a refusal is, and whether its per-call lines are budgeted.

The runtime's ``rpc failed`` line used ``caused_by_caller`` and the key broker's own lines
``refusals.line_budgeted``; they disagreed on failures the broker logs on bounded lines of its
own: through an HSM or audit outage each refused call's ``rpc failed`` was written every time,
and a key version other replicas kept moving had its ``key release denied`` written every time
though ``state_lines`` logs it once and counts it.
"""

from __future__ import annotations

import pytest

from strongroom.errors import (
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
    StrongroomError,
    Unavailable,
    caused_by_caller,
    line_budgeted,
)
from strongroom.keybroker.errors import (
    AuditLogClosed,
    AuditTampered,
    AuditUnavailable,
    HsmUnavailable,
    KeyStateMoving,
    PolicyUnreadable,
    StoredPolicyInvalid,
)
from strongroom.reasons import Reason

# (the failure, its caller's fault, its per-call lines within the caller's budget)
CASES: list[tuple[StrongroomError, bool, bool]] = [
    (InvalidArgument("bad"), True, True),
    (PermissionDenied("no"), True, True),
    (FailedPrecondition("not now"), True, True),
    (Unavailable("fetch slots", reason=Reason.COLLATERAL_FETCH_BUSY), True, True),
    # The broker's failures with bounded lines of their own.
    (HsmUnavailable("module gone"), False, True),
    (AuditUnavailable("disk full"), False, True),
    (AuditLogClosed(), False, True),
    (AuditTampered("head does not match"), False, True),
    (PolicyUnreadable("permission denied"), False, True),
    (StoredPolicyInvalid("bad value", reason=Reason.POLICY_BAD_VALUE), False, True),
    (KeyStateMoving("disabled 4 times in 4 attempts"), False, True),
    # Failures with no line of their own: every per-call line is written.
    (Unavailable("a dependency is down"), False, False),
    (Internal("a bug"), False, False),
    (DataLoss("a blob fails its check"), False, False),
]


@pytest.mark.parametrize(
    ("failure", "theirs", "budgeted"),
    CASES,
    ids=[f"{type(f).__name__}-{f.reason}" for f, _, _ in CASES],
)
def test_whose_fault_and_whether_budgeted(
    failure: StrongroomError, theirs: bool, budgeted: bool
) -> None:
    assert caused_by_caller(failure) is theirs
    assert line_budgeted(failure) is budgeted


def test_anything_but_a_strongroom_error_is_written_every_time() -> None:
    assert not line_budgeted(ValueError("a bug"))
