"""What the S3 backend tells operators in its log lines.

Against the real S3 server (moto's) behind the fault proxy, as ``test_s3``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from strongroom.artifact import StructureValidator
from strongroom.modelstore.storage import S3Storage
from tests.modelstore import s3server
from tests.modelstore.artifacts import make_artifact
from tests.modelstore.conftest import S3_TEST_PART_SIZE

_ARN = "arn:aws:kms:eu-west-1:210987654321:key/1234abcd-12ab-34cd-56ef-1234567890ab"
_ACCOUNT = "210987654321"


def _replica(endpoint: str, bucket: str, **kw: Any) -> S3Storage:
    client = s3server.client(endpoint, max_attempts=1)
    return S3Storage(client, bucket, prefix="p/", part_size=S3_TEST_PART_SIZE, **kw)


@pytest.fixture
def proxy(s3_server: s3server.MotoServer) -> Iterator[s3server.FaultProxy]:
    p = s3server.FaultProxy(s3_server.port)
    try:
        yield p
    finally:
        p.close()


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
