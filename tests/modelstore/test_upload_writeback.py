"""The filesystem backend starts writing an upload to disk while it arrives, so that the final
fsync does not write all of it after the last byte (with free memory the kernel starts no
writeback of its own before it)."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from pathlib import Path

import pytest

from strongroom.artifact import StructureValidator
from strongroom.modelstore._blobs import WRITEBACK_STEP, BlobStore, start_writeback
from strongroom.modelstore._filesystem import FilesystemStorage
from tests.modelstore.artifacts import chunked, make_artifact
from tests.modelstore.backends import assert_clean

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range is Linux's")


@linux_only
def test_an_upload_file_is_written_back_while_it_grows(tmp_path: Path) -> None:
    temp = BlobStore(tmp_path).new_temp()
    block = os.urandom(WRITEBACK_STEP // 2)
    try:
        temp.write(block)
        assert temp.writeback_started == 0  # less than a step: nothing asked yet
        for _ in range(4):
            temp.write(block)
        assert temp.writeback_started == 2 * WRITEBACK_STEP  # the last half step waits for seal
        temp.seal()
        assert temp.path.read_bytes() == block * 5
    finally:
        temp.discard()


@linux_only
def test_writeback_is_a_hint_where_a_file_cannot_take_it_and_an_error_otherwise() -> None:
    read_end, write_end = os.pipe()
    try:
        assert start_writeback(write_end, 0, WRITEBACK_STEP) is False  # ESPIPE: not a file
    finally:
        os.close(read_end)
        os.close(write_end)
    with pytest.raises(OSError) as raised:
        start_writeback(-1, 0, WRITEBACK_STEP)
    assert raised.value.errno == errno.EBADF


def test_a_stored_upload_is_intact_with_writeback(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path / "store")
    try:
        artifact = make_artifact("acme/big", "1", os.urandom(3 * WRITEBACK_STEP + 12345))
        record = storage.put(chunked(artifact, 1 << 20), StructureValidator())
        assert record.artifact_sha256 == hashlib.sha256(artifact).hexdigest()
        with storage.open(record.name, record.version) as reader:
            assert b"".join(reader.chunks(1 << 20)) == artifact
        assert_clean(storage)
    finally:
        storage.close()
