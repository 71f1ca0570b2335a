"""Anchors: Strongroom's decryption beside age and Tink streaming AEAD, on the same bytes, same run.

One random plaintext of ``size_mib`` MiB is encrypted three times — as a Strongroom artifact (C2SP
chunked AES-256-GCM, 16 KiB chunks), with **age** (the Debian ``age`` binary, an X25519 recipient;
ChaCha20-Poly1305 in 64 KiB chunks) and with **Tink**'s streaming AEAD (PyPI ``tink``, key
template ``AES256_GCM_HKDF_1MB``: AES-256-GCM in 1 MiB segments) — and each tool then decrypts its
own ciphertext; every output is checked against the plaintext's SHA-256 once, outside the timing.

Timed (best of ``artifact_bench.REPEATS``, the machine is shared):

* Strongroom ``stream``: :class:`StreamDecryptor` fed 1 MiB pieces, plaintext to a sink, one
  thread — the like-for-like of the other two, which are single-threaded streaming decryptors;
* Strongroom ``buffered_stream``: :class:`BufferedStreamDecryptor` fed 1 MiB pieces into one
  buffer on 2 threads (the model download path);
* Strongroom ``decrypt_all``: whole-artifact decryption into a fresh buffer, 1 and 2 threads;
* age: ``age -d -i KEY -o /dev/null FILE`` with the ciphertext in memory (``/dev/shm`` when the
  machine has it, otherwise a page-cached temporary file); reported as measured and with the
  process start (the same command on an empty file, same run) subtracted;
* Tink: ``new_decrypting_stream`` over the ciphertext in memory, ``readinto`` a reused 1 MiB
  buffer, one thread.

Ratios are throughput ratios: ``strongroom_<mode>_over_<anchor>`` > 1 means Strongroom is faster.
Usage: ``python -m tests.bench.run anchors``; ``STRONGROOM_BENCH_ANCHORS_MIB`` overrides 256.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.artifact_bench import _best, _gbps

PIECE = 1 << 20

FIELDS: dict[str, Any] = {
    "model_name": "bench/anchors",
    "model_version": "1",
    "content_type": "application/octet-stream",
    "key_id": "bench-kek",
    "key_version": 1,
    "wrapped_dek": bytes(40),
}


def _scratch_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class _KeepOpen(io.BytesIO):
    """A BytesIO that Tink's encrypting stream may ``close`` without losing the ciphertext."""

    def close(self) -> None:
        pass


def _strongroom(plain: bytes, digest: bytes) -> dict[str, float]:
    from strongroom.artifact import (
        ArtifactReader,
        BufferedStreamDecryptor,
        StreamDecryptor,
        encrypt_stream,
    )

    dek = bytearray(os.urandom(32))
    blob = b"".join(encrypt_stream(io.BytesIO(plain), dek, **FIELDS))
    reader = ArtifactReader(blob)
    view = memoryview(blob)

    def stream(check: bool = False) -> None:
        dec = StreamDecryptor(dek)
        h = hashlib.sha256() if check else None
        for i in range(0, len(blob), PIECE):
            out = dec.feed(view[i : i + PIECE])
            if h is not None:
                h.update(out)
        dec.finish()
        if h is not None and h.digest() != digest:
            raise AssertionError("Strongroom stream output differs from the plaintext")

    def buffered() -> bytearray | bytes:
        dec = BufferedStreamDecryptor(dek, threads=2)
        for i in range(0, len(blob), PIECE):
            dec.feed(view[i : i + PIECE])
        return dec.finish()

    stream(check=True)
    if hashlib.sha256(buffered()).digest() != digest:
        raise AssertionError("Strongroom buffered output differs from the plaintext")
    if hashlib.sha256(reader.decrypt_all(dek, threads=2)).digest() != digest:
        raise AssertionError("Strongroom decrypt_all output differs from the plaintext")
    return {
        "stream_1_thread": _best(stream),
        "buffered_stream_2_threads": _best(buffered),
        "decrypt_all_1_thread": _best(functools.partial(reader.decrypt_all, dek, threads=1)),
        "decrypt_all_2_threads": _best(functools.partial(reader.decrypt_all, dek, threads=2)),
    }


def _age(plain: bytes, digest: bytes, tmp: Path) -> dict[str, Any]:
    age = shutil.which("age")
    keygen = shutil.which("age-keygen")
    if age is None or keygen is None:
        raise RuntimeError("the age binaries are missing: run `make setup` (Debian package age)")
    key = tmp / "age.key"
    subprocess.run([keygen, "-o", str(key)], check=True, capture_output=True)
    recipient = subprocess.run(
        [keygen, "-y", str(key)], check=True, capture_output=True, text=True
    ).stdout.strip()
    src, enc, empty, empty_enc = (tmp / n for n in ("plain", "ct.age", "empty", "empty.age"))
    src.write_bytes(plain)
    empty.write_bytes(b"")
    for s, d in ((src, enc), (empty, empty_enc)):
        subprocess.run([age, "-r", recipient, "-o", str(d), str(s)], check=True)
    src.unlink()  # only the ciphertext stays in memory
    check = subprocess.run([age, "-d", "-i", str(key), str(enc)], check=True, capture_output=True)
    if hashlib.sha256(check.stdout).digest() != digest:
        raise AssertionError("age output differs from the plaintext")
    del check

    def decrypt(path: Path) -> None:
        subprocess.run([age, "-d", "-i", str(key), "-o", os.devnull, str(path)], check=True)

    return {
        "process": _best(functools.partial(decrypt, enc)),
        "startup": _best(functools.partial(decrypt, empty_enc)),
        "version": subprocess.run(
            [age, "--version"], check=True, capture_output=True, text=True
        ).stdout.strip(),
    }


def _tink(plain: bytes, digest: bytes) -> dict[str, Any]:
    import tink
    from tink import streaming_aead

    streaming_aead.register()
    handle = tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)
    primitive = handle.primitive(streaming_aead.StreamingAead)
    aad = b"bench/anchors"
    sink = _KeepOpen()
    with primitive.new_encrypting_stream(sink, aad) as enc:
        view = memoryview(plain)
        for i in range(0, len(plain), PIECE):
            enc.write(view[i : i + PIECE])
    ciphertext = sink.getvalue()
    buf = bytearray(PIECE)

    def decrypt(check: bool = False) -> None:
        h = hashlib.sha256() if check else None
        with primitive.new_decrypting_stream(io.BytesIO(ciphertext), aad) as dec:
            while n := dec.readinto(buf):
                if h is not None:
                    h.update(memoryview(buf)[:n])
        if h is not None and h.digest() != digest:
            raise AssertionError("Tink output differs from the plaintext")

    decrypt(check=True)
    from importlib.metadata import version

    return {"seconds": _best(decrypt), "version": version("tink")}


def run(results: dict[str, Any], *, size_mib: int | None = None) -> None:
    """Fills ``results`` with each tool's decryption throughput and Strongroom's ratios to them."""
    size_mib = size_mib or int(os.environ.get("STRONGROOM_BENCH_ANCHORS_MIB", "256"))
    size = size_mib << 20
    plain = os.urandom(size)
    digest = hashlib.sha256(plain).digest()
    strongroom = _strongroom(plain, digest)
    with tempfile.TemporaryDirectory(prefix="anchors-bench-", dir=_scratch_dir()) as tmp:
        age = _age(plain, digest, Path(tmp))
    tink = _tink(plain, digest)
    age_net = max(age["process"] - age["startup"], 1e-9)
    anchors = {"age": age["process"], "age_excl_startup": age_net, "tink": tink["seconds"]}
    results["size_mib"] = size_mib
    results["strongroom_gbps"] = {mode: _gbps(size, s) for mode, s in strongroom.items()}
    results["age_gbps"] = _gbps(size, age["process"])
    results["age_gbps_excl_startup"] = _gbps(size, age_net)
    results["age_startup_ms"] = round(age["startup"] * 1000, 1)
    results["tink_gbps"] = _gbps(size, tink["seconds"])
    results["ratios"] = {
        f"strongroom_{mode}_over_{anchor}": round(anchor_s / s, 2)
        for mode, s in strongroom.items()
        for anchor, anchor_s in anchors.items()
    }
    results["versions"] = {"age": age["version"], "tink": tink["version"]}
    results["ciphers"] = {
        "strongroom": "C2SP chunked AES-256-GCM, 16 KiB chunks",
        "age": "X25519 recipient, ChaCha20-Poly1305, 64 KiB chunks (Go binary, output /dev/null)",
        "tink": "streaming AEAD AES256_GCM_HKDF_1MB (C++ via pybind11)",
    }


if __name__ == "__main__":
    import json

    out: dict[str, Any] = {}
    run(out, size_mib=int(os.environ.get("STRONGROOM_BENCH_ANCHORS_MIB", "64")))
    print(json.dumps(out, indent=2))
