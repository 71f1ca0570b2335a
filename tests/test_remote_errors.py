"""strongroom.client.remote: a peer's refusal keeps the peer's reason (from the trailer, never the
message text) and, for DATA_LOSS and friends, its status — for the single-artifact loader and the
multi-part fetch library alike (the fetch library used to parse the message and turn DATA_LOSS into
FAILED_PRECONDITION)."""

from __future__ import annotations

import grpc
import pytest

from strongroom.client import fetch, remote
from strongroom.errors import DataLoss, DeadlineExceeded, FailedPrecondition, NotFound, Unavailable
from strongroom.reasons import METADATA_KEY, Reason


class _Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, reason: str | None) -> None:
        self._code, self._details = code, details
        self._trailers = ((METADATA_KEY, reason),) if reason else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize(
    ("code", "reason", "expected", "expected_reason"),
    [
        (grpc.StatusCode.DATA_LOSS, "BLOB_SIZE_MISMATCH", DataLoss, "BLOB_SIZE_MISMATCH"),
        (grpc.StatusCode.UNAVAILABLE, None, Unavailable, "FETCH_UNAVAILABLE"),
        (grpc.StatusCode.CANCELLED, None, Unavailable, "FETCH_UNAVAILABLE"),
        # The publisher's class for it too (remote.TRANSIENT): it was Unavailable here.
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, DeadlineExceeded, "FETCH_UNAVAILABLE"),
        (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", NotFound, "MODEL_NOT_FOUND"),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "MEASUREMENT_NOT_ALLOWED",
            FailedPrecondition,
            "MEASUREMENT_NOT_ALLOWED",
        ),
        (grpc.StatusCode.PERMISSION_DENIED, None, FailedPrecondition, "FETCH_DENIED"),
    ],
)
def test_status_and_reason_survive(code, reason, expected, expected_reason) -> None:
    error = remote.remote_error("fetch", _Refusal(code, "whatever the text says", reason))
    assert type(error) is expected
    assert error.reason == expected_reason


def test_the_message_text_never_supplies_the_reason() -> None:
    forged = _Refusal(grpc.StatusCode.INTERNAL, "RELEASED: looks like a reason", None)
    assert remote.remote_error("fetch", forged).reason == "FETCH_REFUSED"
    odd = _Refusal(grpc.StatusCode.DATA_LOSS, "x", "not a reason\n")
    error = remote.remote_error("fetch", odd)
    assert (type(error), error.reason) == (DataLoss, "FETCH_REFUSED")
    assert "(DATA_LOSS)" in error.message


def test_the_fetch_library_uses_the_same_mapping() -> None:
    assert fetch.remote_error is remote.remote_error


@pytest.mark.parametrize("step", ["fetch", "key release"])
@pytest.mark.parametrize("code", list(remote.TRANSIENT))
def test_an_outage_is_the_one_table_s_class_for_every_client(
    step: remote.Step, code: grpc.StatusCode
) -> None:
    """remote_error and the publishers' outage_error read one table: a call out of time was
    Unavailable from the one and DeadlineExceeded from the other."""
    error = remote.remote_error(step, _Refusal(code, "gone", None))
    assert type(error) is remote.TRANSIENT[code]
    assert isinstance(error, remote.OUTAGES)
    assert error.reason == ("FETCH_UNAVAILABLE" if step == "fetch" else "KEY_RELEASE_UNAVAILABLE")


@pytest.mark.parametrize(
    ("code", "expected_reason"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "FETCH_DENIED"),
        (grpc.StatusCode.UNAVAILABLE, "FETCH_UNAVAILABLE"),
        (grpc.StatusCode.FAILED_PRECONDITION, "FETCH_REFUSED"),
    ],
)
def test_a_reason_outside_the_catalogue_is_not_taken_from_a_peer(
    code: grpc.StatusCode, expected_reason: str
) -> None:
    """Reasons label the inference service's load metrics: a store sending a new made-up reason
    with every refusal could fill the metrics SDK's label sets (2,000) and push real series out."""
    made_up = _Refusal(code, "the peer's words stay in the message", "MADE_UP_REASON_7")
    error = remote.remote_error("fetch", made_up)
    assert error.reason == expected_reason
    assert "the peer's words stay in the message" in error.message


@pytest.mark.parametrize("step", ["fetch", "key release"])
@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_every_fallback_reason_is_in_the_catalogue(
    step: remote.Step, code: grpc.StatusCode
) -> None:
    """Without a peer reason the fallback was made up from the step and the status
    (``KEY_RELEASE_INTERNAL``, ``FETCH_ABORTED``, ...), 34 codes the catalogue did not hold, and a
    refused fetch was labelled ``KEY_RELEASE_DENIED``."""
    error = remote.remote_error(step, _Refusal(code, "no reason sent", None))
    assert error.reason in {r.value for r in Reason}
    if code is grpc.StatusCode.PERMISSION_DENIED:
        assert error.reason == ("FETCH_DENIED" if step == "fetch" else "KEY_RELEASE_DENIED")
