"""What the S3 backend tells operators: a delete that keeps its blob, KMS throttling, log lines.

Against the real S3 server (moto's) behind the fault proxy, as ``test_s3``; the error
classification also at :func:`~strongroom.modelstore._s3.s3_error` with botocore's own error
shapes.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import botocore.exceptions
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from strongroom.artifact import StructureValidator
from strongroom.modelstore import _s3
from strongroom.modelstore._s3 import s3_error
from strongroom.modelstore.errors import ModelNotFound, StorageUnavailable
from strongroom.modelstore.storage import S3Storage
from tests.modelstore import s3server
from tests.modelstore.artifacts import make_artifact
from tests.modelstore.conftest import replica

_ARN = "arn:aws:kms:eu-west-1:210987654321:key/1234abcd-12ab-34cd-56ef-1234567890ab"
_ACCOUNT = "210987654321"


def _replica(endpoint: str, bucket: str, **kw: Any) -> S3Storage:
    """A replica whose client does not retry: each fault is the call's answer."""
    return replica(endpoint, bucket, client={"max_attempts": 1}, **kw)


@pytest.fixture
def kept_metric(monkeypatch: pytest.MonkeyPatch) -> InMemoryMetricReader:
    """The store's kept-blob counter, read in memory (``raising``: it must exist)."""
    reader = InMemoryMetricReader()
    counter = (
        MeterProvider(metric_readers=[reader])
        .get_meter("test")
        .create_counter("strongroom.modelstore.blobs_kept")
    )
    monkeypatch.setattr(_s3, "BLOBS_KEPT", counter, raising=True)
    return reader


def _counted(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    return {
        str(dict(point.attributes or {}).get("cause")): int(point.value)  # type: ignore[attr-defined]
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    }


@pytest.mark.parametrize(
    ("status", "code", "cause"),
    [(400, "KMS.DisabledException", "kms_key"), (403, "AccessDenied", "access_denied")],
)
def test_a_delete_that_keeps_its_blob_says_so_at_once_and_why(
    proxy: s3server.FaultProxy,
    s3_server: s3server.MotoServer,
    s3_bucket: str,
    kept_metric: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
    status: int,
    code: str,
    cause: str,
) -> None:
    """A delete whose read of the blob's head is refused for good (a disabled KMS key, a 403)
    deletes the record and keeps the blob. Nothing counted it, and its two WARNINGs said the
    head "cannot be read (KMS.DisabledException)" before the record was even deleted, then that
    "its header does not show it is that model's", as if the blob were someone else's: the one
    signal was a start's sweep a day later, calling it a crash's leftover. Now one line, after
    the record is gone, names the blob, the cause's class and the error code (never the object
    store's message, which names the KMS key's ARN), and ``strongroom.modelstore.blobs_kept``
    counts it by cause; the later sweep reports the same blob, naming a delete as a source."""
    store = _replica(proxy.endpoint, s3_bucket)
    store.put([make_artifact("acme/m", "1", b"m" * 300)], StructureValidator())
    (blob,) = store.blob_sizes()
    proxy.inject(
        s3server.Fault(
            lambda m, p: m == "GET" and "/p/blobs/" in p,
            status=status,
            code=code,
            message=f"The ciphertext refers to a customer master key {_ARN} that is disabled.",
        )
    )
    with caplog.at_level(logging.INFO, logger="strongroom.modelstore._s3"):
        store.delete("acme/m", "1")
    proxy.clear()
    with pytest.raises(ModelNotFound):
        store.stat("acme/m", "1")
    assert list(store.blob_sizes()) == [blob]
    kept = [r for r in caplog.records if "kept" in r.getMessage()]
    assert len(kept) == 1, [r.getMessage() for r in kept]
    line = kept[0].getMessage()
    assert kept[0].levelno == logging.WARNING
    assert f"p/{blob}" in line and cause in line and code in line and f"HTTP {status}" in line
    assert "does not show" not in line
    assert "orphan_grace" in line
    assert _ARN not in caplog.text and _ACCOUNT not in caplog.text
    assert _counted(kept_metric) == {cause: 1}

    caplog.clear()
    later = datetime.now(UTC) + timedelta(days=2)  # the blob is past the grace period
    with caplog.at_level(logging.WARNING, logger="strongroom.modelstore._s3"):
        swept = _replica(s3_server.endpoint, s3_bucket, clock=lambda: later)
    assert swept.last_sweep is not None and swept.last_sweep.orphan_blobs == (blob,)
    (orphan,) = [
        r.getMessage() for r in caplog.records if "referenced by no index" in r.getMessage()
    ]
    assert "its delete kept" in orphan


def test_two_deletes_racing_report_a_kept_blob_once(
    proxy: s3server.FaultProxy,
    s3_server: s3server.MotoServer,
    s3_bucket: str,
    kept_metric: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two deletes of one model whose blob's head is refused for good (two replicas, or a
    client's retry while its first call still runs): both read the record and the head, one
    deletes the record and reports the blob kept, the other finds the record gone (404 to its
    first attempt) and answers NOT_FOUND. That one reported the blob kept as well: two WARNINGs,
    and ``blobs_kept`` counted one blob twice. The delete that removed the record reports it."""
    other_proxy = s3server.FaultProxy(s3_server.port)
    try:
        disabled = "KMS.DisabledException"
        other_proxy.inject(
            s3server.Fault(lambda m, p: m == "GET" and "/p/blobs/" in p, status=400, code=disabled)
        )
        other = _replica(other_proxy.endpoint, s3_bucket)
        store = _replica(proxy.endpoint, s3_bucket)
        store.put([make_artifact("acme/m", "1", b"m" * 300)], StructureValidator())
        (blob,) = store.blob_sizes()

        def other_deletes_first(method: str, path: str) -> bool:
            # This store has read the record and now reads the head: the other replica's delete
            # runs to its end before this store goes on.
            if method == "GET" and "/p/blobs/" in path:
                other.delete("acme/m", "1")
                return True
            return False

        proxy.inject(s3server.Fault(other_deletes_first, status=400, code=disabled, times=1))
        with (
            caplog.at_level(logging.INFO, logger="strongroom.modelstore._s3"),
            pytest.raises(ModelNotFound),
        ):
            store.delete("acme/m", "1")
    finally:
        other_proxy.close()
    assert list(store.blob_sizes()) == [blob]
    kept = [r.getMessage() for r in caplog.records if "kept (kms_key)" in r.getMessage()]
    assert len(kept) == 1, kept
    assert _counted(kept_metric) == {"kms_key": 1}


@pytest.mark.parametrize(("status", "code"), [(412, "PreconditionFailed"), (403, "AccessDenied")])
def test_a_kept_blob_is_reported_only_once_its_record_is_deleted(
    proxy: s3server.FaultProxy,
    s3_bucket: str,
    kept_metric: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
    status: int,
    code: str,
) -> None:
    """The kept-blob line and count come after the record's delete: a record changed since it
    was read (412: read again, its head read again) is reported once, and a record delete that
    fails (403, nothing deleted) reports nothing kept. Reported with the
    head's refusal, each pass said it again, and a failed delete said a blob was kept of a model
    still stored."""
    store = _replica(proxy.endpoint, s3_bucket)
    store.put([make_artifact("acme/m", "1", b"m" * 300)], StructureValidator())
    proxy.inject(
        s3server.Fault(
            lambda m, p: m == "GET" and "/p/blobs/" in p, status=400, code="KMS.DisabledException"
        )
    )
    proxy.inject(
        s3server.Fault(
            lambda m, p: m == "DELETE" and "/p/index/" in p,
            status=status,
            code=code,
            times=1 if status == 412 else None,
        )
    )
    with caplog.at_level(logging.INFO, logger="strongroom.modelstore._s3"):
        if status == 412:
            store.delete("acme/m", "1")
        else:
            with pytest.raises(StorageUnavailable):
                store.delete("acme/m", "1")
    kept = [r.getMessage() for r in caplog.records if "kept (kms_key)" in r.getMessage()]
    if status == 412:
        assert len(kept) == 1, kept
        assert _counted(kept_metric) == {"kms_key": 1}
    else:
        assert kept == []
        assert _counted(kept_metric) == {}
        proxy.clear()
        assert store.stat("acme/m", "1").name == "acme/m"  # still stored: retry the delete


@pytest.mark.parametrize("code", ["KMS.ThrottlingException", "KMS.Throttling", "KMS.SlowDown"])
def test_kms_throttling_a_deletes_head_read_fails_the_delete_and_keeps_the_model(
    proxy: s3server.FaultProxy,
    s3_bucket: str,
    kept_metric: InMemoryMetricReader,
    code: str,
) -> None:
    """What s3_error calls KMS throttling (S3_THROTTLED: transient, retry) is what a delete's
    read of the head takes as passing: the delete fails with nothing deleted. The two rules were
    written twice and disagreed: s3_error took any KMS code naming throttling as such, the
    delete only KMS.ThrottlingException, so for the others it deleted the record and kept the
    blob for good, as for a disabled key, while the same answer elsewhere said retry later."""
    store = _replica(proxy.endpoint, s3_bucket)
    store.put([make_artifact("acme/m", "1", b"m" * 300)], StructureValidator())
    proxy.inject(
        s3server.Fault(lambda m, p: m == "GET" and "/p/blobs/" in p, status=400, code=code)
    )
    with pytest.raises(StorageUnavailable) as info:
        store.delete("acme/m", "1")
    assert info.value.reason == "S3_THROTTLED"
    assert s3_error(_client_error(code, 400), "x").reason == "S3_THROTTLED"
    proxy.clear()
    assert store.stat("acme/m", "1").name == "acme/m"
    assert _counted(kept_metric) == {}


def test_a_delete_whose_blob_is_already_gone_reports_nothing_kept(
    s3_server: s3server.MotoServer,
    s3_bucket: str,
    kept_metric: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A blob found missing by the delete's head read was logged as "kept: its header does not
    show it is that model's": nothing was kept. Now nothing is said of it, nor counted."""
    store = _replica(s3_server.endpoint, s3_bucket)
    store.put([make_artifact("acme/m", "1", b"m" * 300)], StructureValidator())
    (blob,) = store.blob_sizes()
    store._client.delete_object(Bucket=s3_bucket, Key=f"p/{blob}")
    with caplog.at_level(logging.INFO, logger="strongroom.modelstore._s3"):
        store.delete("acme/m", "1")
    assert not [r for r in caplog.records if "kept" in r.getMessage()]
    assert _counted(kept_metric) == {}


def test_a_failed_blob_delete_logs_the_error_code_not_the_object_stores_message(
    proxy: s3server.FaultProxy, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """WARNING lines logged botocore's errors with %r: the object store's message went into
    operators' logs as it was (a KMS key's ARN and its account, request ids, bucket names).
    They name the error code, the HTTP status and the operation now."""
    store = _replica(proxy.endpoint, s3_bucket)
    store.put([make_artifact("acme/m", "1", b"m" * 300)], StructureValidator())
    proxy.inject(
        s3server.Fault(
            lambda m, p: m == "DELETE" and "/p/blobs/" in p,
            status=403,
            code="AccessDenied",
            message=f"User is not authorized to perform: kms:Decrypt on resource: {_ARN}",
        )
    )
    with caplog.at_level(logging.WARNING, logger="strongroom.modelstore._s3"):
        store.delete("acme/m", "1")
    (line,) = [r.getMessage() for r in caplog.records if "cannot delete blob" in r.getMessage()]
    assert "AccessDenied (HTTP 403) from DeleteObject" in line
    assert _ARN not in caplog.text and _ACCOUNT not in caplog.text


def _client_error(code: str, status: int, operation: str = "GetObject") -> Exception:
    """The error botocore raises for an S3 answer of ``status`` with error ``code`` (SSE-KMS
    refusals carry the key's ARN in their message)."""
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": f"KMS said no about {_ARN}"},
            "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 0},
        },
        operation,
    )


@pytest.mark.parametrize(
    ("code", "status"),
    [("KMS.ThrottlingException", 400), ("ThrottlingException", 400), ("SlowDown", 503)],
)
def test_kms_throttling_reads_as_throttling_not_as_a_key_to_check(code: str, status: int) -> None:
    """S3 passes KMS throttling on as KMS.ThrottlingException: it was S3_KMS_ERROR, "check the
    key's state and the store's kms:Decrypt and kms:GenerateDataKey permissions", so an operator
    went after a key that was fine. It is S3_THROTTLED (UNAVAILABLE: retried) now, saying
    throttled and transient, as S3's own throttling is."""
    error = s3_error(_client_error(code, status), "opening an artifact")
    assert error.reason == "S3_THROTTLED"
    assert "throttl" in error.message and "check the key" not in error.message
    assert _ARN not in error.message


@pytest.mark.parametrize(
    "code",
    ["KMS.KMSInternalException", "KMS.DependencyTimeoutException", "KMS.KeyUnavailableException"],
)
def test_a_passing_kms_failure_says_transient_not_check_the_key(code: str) -> None:
    """KMS failing for the moment (its own internal error, a custom key store out of reach) is
    still S3_KMS_ERROR, but reads as transient, not as a key whose state to check."""
    error = s3_error(_client_error(code, 500), "opening an artifact")
    assert error.reason == "S3_KMS_ERROR"
    assert "transient" in error.message and "check the key" not in error.message
    assert code in error.message


def test_a_refusing_kms_key_still_says_check_the_key() -> None:
    error = s3_error(_client_error("KMS.DisabledException", 400), "opening an artifact")
    assert error.reason == "S3_KMS_ERROR"
    assert "check the key's state" in error.message and _ARN not in error.message


_URL = "https://models-prod.s3.eu-west-1.amazonaws.com/p/blobs/20261207T000000Z-secretkey"


@pytest.mark.parametrize(
    "exc",
    [
        botocore.exceptions.ReadTimeoutError(endpoint_url=_URL),
        botocore.exceptions.ConnectTimeoutError(endpoint_url=_URL),
        botocore.exceptions.EndpointConnectionError(endpoint_url=_URL),
        botocore.exceptions.ConnectionClosedError(endpoint_url=_URL),
        _client_error("AccessDenied", 403),
        _client_error("InternalError", 500),
        _client_error(f"KMS.{_ARN}", 400),  # a code a proxy before the store made up
        _client_error(_URL, 400),
    ],
    ids=lambda e: type(e).__name__,
)
def test_s3_error_logs_no_message_url_or_arn(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """Every line :func:`s3_error` logs names the failure by :func:`_s3._failure` (an error
    name, the HTTP status and the operation, or the error's class): a timeout's or a dropped
    connection's endpoint URL (bucket and key), the object store's message (a KMS key's ARN and
    account) and an error code that is no error name stay out of the log, as out of the
    caller's message."""
    with caplog.at_level(logging.ERROR, logger="strongroom.modelstore._s3"):
        error = s3_error(exc, "reading an artifact")
    assert caplog.records, "s3_error logs the failure"
    for text in (caplog.text, error.message):
        assert _ARN not in text and _ACCOUNT not in text
        assert "models-prod" not in text and "secretkey" not in text
