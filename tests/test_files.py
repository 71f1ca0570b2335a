"""strongroom.files.atomic_write: complete or absent, never wider than asked, no debris."""

from __future__ import annotations

import os
import stat

import pytest

from strongroom.files import atomic_write


def test_creates_with_the_mode_asked_for(tmp_path) -> None:
    target = tmp_path / "sub" / "secret"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(tmp_path / "public", b"x", mode=0o644)
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644


def test_replaces_and_fsyncs_file_and_directory(tmp_path, monkeypatch) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert synced == ["file", "dir"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
