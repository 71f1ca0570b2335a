"""The worked examples of ARTIFACT_FORMAT.md §8 and §9, and the script that regenerates the goldens.

``python -m tests.artifact.golden --write`` rewrites ``tests/data/artifact/*.srmodel`` and their
SHA256SUMS; the tests only compare (a format change must be a deliberate, reviewed rewrite).

All three examples encrypt ``hello, model\\n`` under DEK ``00 01 … 1f`` with salt ``c0 c1 … d7``:

* ``golden-v1.srmodel`` — format 1, wrapped DEK a placeholder (``a6`` eight times, then ``20 … 3f``);
* ``golden-v2.srmodel`` — format 2, the DEK wrapped (AES-KWP, RFC 5649) under KEK version 1 =
  ``40 41 … 5f``;
* ``golden-v2-rewrapped.srmodel`` — the same artifact after a re-wrap to KEK version 2 =
  ``60 61 … 7f``: only the key slot differs, body and footer are byte-identical.
"""

from __future__ import annotations

import hashlib
import sys
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from strongroom.artifact import KeySlot, build_header, encrypt_bytes, parse_header, with_key_slot

DATA = Path(__file__).resolve().parents[1] / "data" / "artifact"
PLAINTEXT = b"hello, model\n"
DEK = bytes(range(32))
SALT = bytes(range(0xC0, 0xD8))
KEK_V1 = bytes(range(0x40, 0x60))
KEK_V2 = bytes(range(0x60, 0x80))
_FIELDS = {
    "model_name": "acme/iris",
    "model_version": "1.0.0",
    "content_type": "application/vnd.onnx",
    "key_id": "models-kek",
    "key_version": 1,
    "plaintext_size": len(PLAINTEXT),
    "created_at": datetime(2025, 11, 25, 12, 0, 0, tzinfo=UTC),
}


def golden_v1() -> bytes:
    """The format-1 worked example (§8)."""
    header = build_header(
        **_FIELDS,  # type: ignore[arg-type]
        wrapped_dek=bytes.fromhex("a6" * 8) + bytes(range(0x20, 0x40)),
        format_version=1,
    )
    return encrypt_bytes(PLAINTEXT, bytearray(DEK), header=header, salt=SALT)


def golden_v2() -> bytes:
    """The format-2 worked example (§9), with a real AES-KWP wrap under KEK version 1."""
    header = build_header(
        **_FIELDS,  # type: ignore[arg-type]
        wrapped_dek=aes_key_wrap_with_padding(KEK_V1, DEK),
        format_version=2,
    )
    return encrypt_bytes(PLAINTEXT, bytearray(DEK), header=header, salt=SALT)


def golden_v2_rewrapped() -> bytes:
    """:func:`golden_v2` after its data key was re-wrapped under KEK version 2 (slot replaced)."""
    original = golden_v2()
    header = parse_header(original)
    slot = KeySlot("models-kek", 2, aes_key_wrap_with_padding(KEK_V2, DEK))
    return with_key_slot(header, slot).head + original[header.header_size :]


GOLDENS = {
    "golden-v1.srmodel": golden_v1,
    "golden-v2.srmodel": golden_v2,
    "golden-v2-rewrapped.srmodel": golden_v2_rewrapped,
}


def write() -> None:
    """Regenerates the golden files and their checksums."""
    DATA.mkdir(parents=True, exist_ok=True)
    for name, make in GOLDENS.items():
        (DATA / name).write_bytes(make())
    lines = [
        f"{hashlib.sha256((DATA / name).read_bytes()).hexdigest()}  {name}"
        for name in sorted([*GOLDENS, "SOURCES.md"])
    ]
    (DATA / "SHA256SUMS").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.artifact.golden --write")
    write()
