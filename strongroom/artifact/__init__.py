"""Encrypted model artifacts: a canonical header bound into a C2SP chunked-encryption body.

The format is described in ``strongroom/artifact/ARTIFACT_FORMAT.md``. Modules:

* :mod:`~strongroom.artifact.c2sp` — c2sp.org/chunked-encryption v1 (raw construction, hazmat);
* :mod:`~strongroom.artifact.format` — layout, header build/parse, keyless summary;
* :mod:`~strongroom.artifact.keybinding` — format 3's body key, bound to the model's name and version;
* :mod:`~strongroom.artifact.validate` — incremental keyless structure validation (model store);
* :mod:`~strongroom.artifact.writer` — one-pass streaming encryption;
* :mod:`~strongroom.artifact.reader` — random access and parallel whole-artifact decryption;
* :mod:`~strongroom.artifact.stream` — incremental decryption of a downloading artifact;
* :mod:`~strongroom.artifact.pipeline` — a download decrypted as it arrives, key obtained alongside.
"""

from strongroom.artifact._memory import output_bytes, wipe, wipe_bytes
from strongroom.artifact.errors import ArtifactTooLarge, DecryptionFailed, InvalidArtifact
from strongroom.artifact.format import (
    FORMAT_V1,
    FORMAT_V2,
    FORMAT_V3,
    FORMAT_VERSION,
    HEADER_WRAP_MECHANISMS,
    MAGIC,
    SUPPORTED_FORMAT_VERSIONS,
    ArtifactHeader,
    ArtifactSummary,
    BodyEncryption,
    KeySlot,
    WrapMechanism,
    build_header,
    parse_header,
    read_header,
    read_summary,
    with_key_slot,
)
from strongroom.artifact.pipeline import DecryptedArtifact, decrypt_download
from strongroom.artifact.reader import ArtifactReader
from strongroom.artifact.stream import (
    DEFAULT_DECRYPT_THREADS,
    BufferedStreamDecryptor,
    StreamDecryptor,
)
from strongroom.artifact.validate import StructureValidator, summarize
from strongroom.artifact.writer import ArtifactWriter, encrypt_bytes, encrypt_stream

__all__ = [
    "DEFAULT_DECRYPT_THREADS",
    "FORMAT_V1",
    "FORMAT_V2",
    "FORMAT_V3",
    "FORMAT_VERSION",
    "HEADER_WRAP_MECHANISMS",
    "MAGIC",
    "SUPPORTED_FORMAT_VERSIONS",
    "ArtifactHeader",
    "ArtifactReader",
    "ArtifactSummary",
    "ArtifactTooLarge",
    "ArtifactWriter",
    "BodyEncryption",
    "BufferedStreamDecryptor",
    "DecryptedArtifact",
    "DecryptionFailed",
    "InvalidArtifact",
    "KeySlot",
    "StreamDecryptor",
    "StructureValidator",
    "WrapMechanism",
    "build_header",
    "decrypt_download",
    "encrypt_bytes",
    "encrypt_stream",
    "output_bytes",
    "parse_header",
    "read_header",
    "read_summary",
    "summarize",
    "wipe",
    "wipe_bytes",
    "with_key_slot",
]
