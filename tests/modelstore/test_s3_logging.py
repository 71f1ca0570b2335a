"""The store's S3 client logs no credential, even with the service logging at DEBUG."""

from __future__ import annotations

import logging

import pytest

from strongroom.modelstore._s3 import make_client
from strongroom.modelstore.config import StorageConfig
from strongroom.runtime.config import LoggingConfig
from strongroom.runtime.logs import configure_logging
from tests.modelstore import s3server


def test_debug_logging_does_not_write_s3_request_signatures(
    s3_server: s3server.MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    monkeypatch.setenv("STRONGROOM_S3_ACCESS_KEY_ID", s3server.ACCESS_KEY)
    monkeypatch.setenv("STRONGROOM_S3_SECRET_ACCESS_KEY", s3server.SECRET_KEY)
    handler = configure_logging(LoggingConfig(level="DEBUG", format="json"), "modelstore")
    client = make_client(StorageConfig(backend="s3", endpoint=s3_server.endpoint, bucket="b"))
    bucket = s3server.new_bucket(client)
    client.put_object(Bucket=bucket, Key="k", Body=b"ciphertext")
    logging.getLogger("strongroom.test").debug("the service's own DEBUG lines still appear")
    handler.flush()  # lines are written by the log's own thread

    err = capsys.readouterr().err
    assert "the service's own DEBUG lines still appear" in err
    assert s3server.ACCESS_KEY not in err
    assert "Signature" not in err
    assert "AWS4-HMAC-SHA256" not in err
