"""The cold-start pipeline: key release alongside the download, pre-faulted output, wiping on failure.

Real cryptography and real threads throughout; ordering between the download and the key release is
forced with events, never with sleeps or timing.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from strongroom.artifact import (
    ArtifactHeader,
    ArtifactTooLarge,
    BufferedStreamDecryptor,
    DecryptionFailed,
    decrypt_download,
)
from strongroom.artifact._memory import Prefaulter, output_bytes
from strongroom.artifact.stream import PREFAULT_AHEAD
from strongroom.errors import FailedPrecondition, Unavailable
from tests.artifact.conftest import CHUNK, header_for

MiB = 1 << 20
WAIT = 60.0  # a bound for event waits (a hang fails the test instead of blocking the suite)


@dataclass
class Key:
    """What a release returns: the data key (and anything else the caller wants back)."""

    dek: bytearray
    decision_id: str = "d-1"


def pieces(artifact: bytes, size: int = MiB) -> list[bytes]:
    return [artifact[i : i + size] for i in range(0, len(artifact), size)]


def _wait_until(predicate: Callable[[], bool]) -> bool:
    done = threading.Event()
    for _ in range(600):
        if predicate():
            return True
        done.wait(0.05)
    return predicate()


# -- Prefaulter --------------------------------------------------------------------------------------


def test_prefaulter_populates_only_what_it_is_allowed_and_never_changes_contents() -> None:
    size = 24 * MiB + 123
    obj, view = output_bytes(size)
    view[: 3 * MiB] = b"\x5a" * (3 * MiB)  # a writer ahead of the prefaulter
    prefaulter = Prefaulter(view, slice_bytes=2 * MiB)
    prefaulter.allow(8 * MiB)
    assert _wait_until(lambda: prefaulter.faulted >= 8 * MiB)
    assert prefaulter.faulted == 8 * MiB, "it must stop at the allowed bound"
    prefaulter.allow(size + 10 * MiB)  # beyond the end: clamped
    assert _wait_until(lambda: prefaulter.faulted == size)
    prefaulter.stop()
    assert obj[: 3 * MiB] == b"\x5a" * (3 * MiB)
    view.release()


def test_prefaulter_wakes_for_a_whole_slice_or_the_end_not_for_each_small_allowance() -> None:
    """Paced by 512 KiB download messages, it woke and populated 512 KiB at a time (~1,000 thread
    hand-offs per 512 MiB, costlier than the faults it moved); now a slice at a time."""
    size = 24 * MiB
    _obj, view = output_bytes(size)
    prefaulter = Prefaulter(view, slice_bytes=4 * MiB)
    for step in range(1, 8):  # 3.5 MiB in 512 KiB steps: less than a slice
        prefaulter.allow(step * MiB // 2)
    time.sleep(0.2)  # ample for a woken thread to populate 3.5 MiB (it did, before)
    assert prefaulter.faulted == 0
    prefaulter.allow(4 * MiB)  # a whole slice
    assert _wait_until(lambda: prefaulter.faulted == 4 * MiB)
    prefaulter.allow(size)  # the end, however little is left
    assert _wait_until(lambda: prefaulter.faulted == size)
    prefaulter.stop()
    view.release()


def test_prefaulter_stops_before_the_end_and_ignores_small_buffers() -> None:
    _obj, view = output_bytes(64 * MiB)
    prefaulter = Prefaulter(view, slice_bytes=2 * MiB)
    prefaulter.stop()  # stopped before being allowed anything: returns, nothing faulted
    assert prefaulter.faulted == 0
    prefaulter.allow(64 * MiB)
    assert prefaulter.faulted == 0
    small = Prefaulter(memoryview(bytearray(4096)))
    small.allow(4096)
    small.stop()
    assert small.faulted == 0
    view.release()


# -- BufferedStreamDecryptor: prefault and holding ----------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * MiB + 5, 70 * MiB + 7])
@pytest.mark.parametrize("as_bytes", [True, False])
def test_prefault_round_trip(
    size: int, as_bytes: bool, dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    plaintext, artifact = make_artifact(size)
    decryptor = BufferedStreamDecryptor(threads=2, as_bytes=as_bytes, prefault=True)
    parts = pieces(artifact, 3 * MiB)
    decryptor.feed(parts[0])
    decryptor.set_dek(dek)
    for part in parts[1:]:
        decryptor.feed(part)
    out = decryptor.finish()
    assert out == plaintext
    if as_bytes:
        decryptor.wipe_output()
        assert out == bytes(size)


def test_prefault_respects_the_size_limit_before_any_key(
    make_artifact: Callable[..., tuple[bytes, bytes]],
) -> None:
    _plaintext, artifact = make_artifact(3 * MiB)
    decryptor = BufferedStreamDecryptor(prefault=True, max_artifact_size=MiB)
    with pytest.raises(ArtifactTooLarge):
        decryptor.feed(artifact[:4096])
    with pytest.raises(ArtifactTooLarge):
        decryptor.feed(artifact[4096:8192])  # a failed stream stays failed


def test_a_huge_claimed_size_commits_no_memory_before_the_data_arrives() -> None:
    # A header claiming 8 GiB, followed by nothing: the buffer is only reserved, the prefaulter
    # runs no further than the bytes received plus its lead, and the failure wipes nothing more.
    head = header_for(8 << 30)
    prefix = head.encoded + head.slot_encoded  # everything before the body (format 1 or 2)
    decryptor = BufferedStreamDecryptor(prefault=True, as_bytes=True)
    decryptor.feed(prefix)
    prefaulter = decryptor._prefaulter
    assert prefaulter is not None
    assert _wait_until(lambda: prefaulter.faulted >= PREFAULT_AHEAD)
    assert prefaulter.faulted <= len(prefix) + PREFAULT_AHEAD
    decryptor.abort()
    assert decryptor._prefaulter is None


def test_body_held_without_key_is_bounded_and_counted(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    plaintext, artifact = make_artifact(6 * MiB)
    decryptor = BufferedStreamDecryptor(max_held_without_key=3 * MiB)
    parts = pieces(artifact, MiB)
    decryptor.feed(parts[0])
    decryptor.feed(parts[1])
    assert 0 < decryptor.held_without_key <= 2 * MiB
    decryptor.feed(parts[2])
    with pytest.raises(FailedPrecondition) as info:
        decryptor.feed(parts[3])
    assert info.value.reason == "DATA_KEY_REQUIRED"

    held = BufferedStreamDecryptor(max_held_without_key=64 * MiB)
    mutable = [bytearray(p) for p in parts]
    for part in mutable:
        held.feed(part)
    for part in mutable:  # the caller reuses its buffers: what was held must be a copy
        part[:] = bytes(len(part))
    held.set_dek(dek)
    assert held.held_without_key == 0
    assert held.finish() == plaintext


# -- decrypt_download --------------------------------------------------------------------------------


def test_key_release_runs_alongside_the_download(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    plaintext, artifact = make_artifact(20 * MiB + 3)
    parts = pieces(artifact)
    all_sent = threading.Event()
    seen: list[ArtifactHeader] = []
    checked: list[ArtifactHeader] = []
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="")
    marker.set("caller-context")
    in_release: list[str] = []
    released_key = bytearray(dek)

    def download() -> Iterator[bytes]:
        yield from parts
        all_sent.set()

    def release(header: ArtifactHeader) -> Key:
        seen.append(header)
        in_release.append(marker.get())
        # The key is only given once the whole artifact was received: decryption must wait for it,
        # holding the body, without failing.
        assert all_sent.wait(WAIT)
        return Key(released_key)

    with decrypt_download(download(), release, check_header=checked.append) as result:
        assert result.plaintext == plaintext
        assert isinstance(result.plaintext, bytes)
        assert result.key.decision_id == "d-1"
        assert set(result.timings) == {"attest_and_release", "key_wait", "fetch_and_decrypt"}
        out = result.plaintext
    assert out == bytes(len(plaintext)), "closing overwrites the plaintext in place"
    assert seen == checked and seen[0].model_name == "acme/fraud-detector"
    assert in_release == ["caller-context"], "the release runs in a copy of the caller's context"
    assert released_key == bytearray(32), "the released key is wiped once used"


def test_the_download_waits_for_the_key_rather_than_hold_more_than_the_limit(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    plaintext, artifact = make_artifact(12 * MiB)
    parts = pieces(artifact)
    limit = 4 * MiB
    must_block = threading.Event()

    def download() -> Iterator[bytes]:
        for i, part in enumerate(parts):
            # Pieces 0-3 hold just under 4 MiB of body (piece 0 starts with the header); piece 4
            # would bring it past the limit: the pipeline must wait for the key before feeding it
            # (feeding it would raise DATA_KEY_REQUIRED; waiting earlier would never end).
            if i == 4:
                must_block.set()
            yield part

    def release(header: ArtifactHeader) -> Key:
        assert must_block.wait(WAIT)
        return Key(bytearray(dek))

    with decrypt_download(download(), release, max_held_without_key=limit) as result:
        assert result.plaintext == plaintext


def test_a_refused_release_is_the_error_and_nothing_is_released(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    _plaintext, artifact = make_artifact(5 * MiB)

    def release(header: ArtifactHeader) -> Key:
        raise FailedPrecondition("denied", reason="MEASUREMENT_NOT_ALLOWED")

    with pytest.raises(FailedPrecondition) as info:
        decrypt_download(pieces(artifact), release)
    assert info.value.reason == "MEASUREMENT_NOT_ALLOWED"


def test_a_refused_header_asks_for_no_key(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    _plaintext, artifact = make_artifact(CHUNK)
    calls: list[ArtifactHeader] = []

    def refuse(header: ArtifactHeader) -> None:
        raise FailedPrecondition("not the model asked for", reason="ARTIFACT_MISMATCH")

    def release(header: ArtifactHeader) -> Key:
        calls.append(header)
        return Key(bytearray(dek))

    with pytest.raises(FailedPrecondition) as info:
        decrypt_download(pieces(artifact), release, check_header=refuse)
    assert info.value.reason == "ARTIFACT_MISMATCH"
    assert calls == []


def test_a_download_failure_wins_and_a_key_arriving_later_is_wiped(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    _plaintext, artifact = make_artifact(8 * MiB)
    parts = pieces(artifact)
    failed = threading.Event()
    late_key = bytearray(dek)

    def download() -> Iterator[bytes]:
        yield from parts[:3]
        raise Unavailable("the store went away", reason="FETCH_UNAVAILABLE")

    def release(header: ArtifactHeader) -> Key:
        assert failed.wait(WAIT)
        return Key(late_key)

    with pytest.raises(Unavailable) as info:
        decrypt_download(download(), release)
    assert info.value.reason == "FETCH_UNAVAILABLE"
    failed.set()
    assert _wait_until(lambda: late_key == bytearray(32)), "a key arriving too late is wiped"


@pytest.mark.parametrize("where", ["early", "late"])
def test_tampered_ciphertext_fails_whether_held_or_streamed(
    where: str, dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    _plaintext, artifact = make_artifact(10 * MiB)
    tampered = bytearray(artifact)
    tampered[MiB if where == "early" else len(tampered) - 3 * MiB] ^= 1
    key = bytearray(dek)
    with pytest.raises(DecryptionFailed):
        decrypt_download(pieces(bytes(tampered)), lambda header: Key(key))
    assert key == bytearray(32)


def test_a_truncated_download_fails(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    _plaintext, artifact = make_artifact(3 * MiB)
    from strongroom.artifact import InvalidArtifact

    with pytest.raises(InvalidArtifact) as info:
        decrypt_download(pieces(artifact[:-100]), lambda header: Key(bytearray(dek)))
    assert info.value.reason == "TRUNCATED"
    with pytest.raises(InvalidArtifact):
        decrypt_download(pieces(artifact[:10]), lambda header: Key(bytearray(dek)))
