"""The filesystem backend starts writing an upload to disk while it arrives, so that the final
fsync does not write all of it after the last byte (with free memory the kernel starts no
writeback of its own before it)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import sys
from pathlib import Path

import grpc
import pytest

from strongroom.artifact import StructureValidator
from strongroom.client.publish import put_model
from strongroom.files import start_writeback
from strongroom.modelstore import _blobs as blobs_module
from strongroom.modelstore._blobs import WRITEBACK_STEP, BlobStore
from strongroom.modelstore._filesystem import FilesystemStorage
from tests.modelstore.artifacts import chunked, make_artifact
from tests.modelstore.backends import assert_clean
from tests.modelstore.conftest import Served

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


def _open_in(root: Path) -> list[str]:
    """The files under ``root`` this process has open."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone by now
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [t for t in targets if t.startswith(str(root))]


@linux_only
def test_an_upload_larger_than_the_store_may_write_a_file_is_refused_as_such(
    fs_served: Served,
) -> None:
    """A write refused with EFBIG (the store's RLIMIT_FSIZE, systemd's LimitFSIZE=, or the
    filesystem's own largest file) was UNAVAILABLE STORAGE_IO, "retrying may help", though every
    retry of that artifact fails the same way: it is RESOURCE_EXHAUSTED STORAGE_FILE_TOO_LARGE,
    and, as for any failed upload, the temporary file and its descriptor are gone."""
    artifact = make_artifact("acme/capped", "1", os.urandom(2 * WRITEBACK_STEP))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing it.
    resource.setrlimit(resource.RLIMIT_FSIZE, (WRITEBACK_STEP + 4096, hard))
    try:
        with pytest.raises(grpc.RpcError) as raised:
            put_model(
                fs_served.channel,
                iter(chunked(artifact, 1 << 20)),
                name="acme/capped",
                version="1",
                timeout=60,
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()
    assert raised.value.details().startswith("STORAGE_FILE_TOO_LARGE: ")
    assert list(fs_served.storage.records()) == []
    assert_clean(fs_served.storage)
    assert _open_in(fs_served.storage.root / "tmp") == []


def test_a_temporary_file_whose_close_fails_is_never_closed_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close(2) releases the descriptor even when it reports an error (NFS, CIFS and FUSE report
    writeback errors there): seal() left its number recorded, and discard() closed it again,
    closing whatever the number was meanwhile given to (another upload's temporary file, a
    socket), so that upload's bytes could go to the wrong file. The number is forgotten first."""
    temp = BlobStore(tmp_path).new_temp()
    temp.write(b"artifact bytes")
    failing = temp._fd
    assert failing is not None
    real_close = os.close

    def close_reporting_an_error(fd: int) -> None:
        real_close(fd)
        if fd == failing:
            raise OSError(errno.EIO, "writeback error reported at close")

    monkeypatch.setattr(blobs_module.os, "close", close_reporting_an_error)
    with pytest.raises(OSError):
        temp.seal()
    monkeypatch.undo()
    other = tmp_path / "another-file"
    reused = os.open(other, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if reused != failing:  # the number the failed close released, as the next open gets it
            os.dup2(reused, failing)
            os.close(reused)
            reused = failing
        temp.discard()
        try:
            os.fstat(reused)
        except OSError as exc:
            raise AssertionError("discard() closed another file's descriptor") from exc
        assert not temp.path.exists()
    finally:
        with contextlib.suppress(OSError):
            os.close(reused)
