"""An artifact encrypted by hand under a GenerateDataKey answer, as a key holder would write it:
the demo and the tests use it to store what the client library would refuse to publish (a model
written under another model's key, a legacy format)."""

from __future__ import annotations

from pathlib import Path

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.artifact import encrypt_stream, wipe
from strongroom.artifact.format import FORMAT_VERSION


def encrypted_pieces(
    path: Path,
    name: str,
    version: str,
    key_id: str,
    key: kb_pb.GenerateDataKeyResponse,
    *,
    format_version: int = FORMAT_VERSION,
    dek: bytearray | None = None,
) -> list[bytes]:
    """``path`` (an ONNX model) encrypted as ``name``/``version`` under ``key``'s data key (or
    ``dek``, which is wiped either way), with ``key``'s wrapped key (under ``key_id``) in its
    slot; the artifact's pieces, ready for PutModel."""
    dek = bytearray(key.data_key) if dek is None else dek
    try:
        with path.open("rb") as source:
            return list(
                encrypt_stream(
                    source,
                    dek,
                    model_name=name,
                    model_version=version,
                    content_type="application/vnd.onnx",
                    key_id=key_id,
                    key_version=key.key_version,
                    wrapped_dek=key.wrapped_data_key,
                    format_version=format_version,
                )
            )
    finally:
        wipe(dek)
