"""Loads models whose weights carry a canary, the way the service does, then reports on its files.

Single-file, in-memory external data, the repository, and a multi-part model (an encrypted graph
and weights part decrypted in memory by the fetch library, then loaded as the service does).

Run in a subprocess by ``test_plaintext_never_on_disk.py`` (under strace when available) with
``CANARY_HEX`` in the environment. Controls that the test's detectors do catch a write:
``PROBE_MODE=unsafe`` makes ONNX Runtime dump the optimised model into the current directory;
``PROBE_MODE=ort-first`` imports onnxruntime before strongroom, so ORT's telemetry database is
created in $HOME.
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("PROBE_MODE") == "ort-first":
    # A regression control: ONNX Runtime imported before strongroom, telemetry left on.
    import onnxruntime  # noqa: F401

# Only strongroom modules import onnxruntime here, as in the service: the probe checks that
# importing them is enough to keep ONNX Runtime off the disk.
from strongroom.inference.models import _loaded as loaded_module  # isort: skip
from strongroom.inference.models import LoadedModel, ModelRepository, RuntimeOptions  # isort: skip
from strongroom.inference.models._ort import ort  # isort: skip

import hashlib
from collections.abc import Iterator

import numpy as np

from strongroom.artifact import build_header, encrypt_bytes
from strongroom.artifact.keybinding import bind_data_key
from strongroom.artifact.manifest import (
    MANIFEST_CONTENT_TYPE,
    ManifestLayout,
    build_manifest,
    header_digest,
    part_version,
)
from strongroom.client.fetch import ModelFetcher
from strongroom.client.keyrelease import ReleasedDataKey
from strongroom.inference.multipart import load_multipart
from tests.inference import onnx_models

O_ACCMODE = 0o3


def _table(canary: bytes) -> np.ndarray:
    repeats = 64 * 1024 // len(canary)
    return np.frombuffer(canary * repeats, dtype="<f4").copy()


def _writable_file_descriptors() -> list[str]:
    """Regular files this process holds open for writing."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            with open(f"/proc/self/fdinfo/{fd}") as info:
                line = next(x for x in info if x.startswith("flags:"))
            flags = int(line.split()[1], 8)
        except (OSError, StopIteration):
            continue
        regular = target.startswith("/") and not target.startswith(("/dev/", "/proc/"))
        if regular and flags & O_ACCMODE:
            found.append(target)
    return found


def _multipart_fetcher(graph: bytes, weights: bytes) -> ModelFetcher:
    """A multi-part model (graph + external weights) encrypted in memory, served from memory.

    The same fetch → decrypt-into-memory → ORT path as the service, with the model store and the
    key broker replaced by in-memory stand-ins (the subprocess has no services).
    """
    dek = bytearray(os.urandom(32))  # the slot key "released" below
    body = bind_data_key(dek, "canary/mp", "1")  # what a publisher encrypts with (format 3)
    common = {
        "model_name": "canary/mp",
        "key_id": "kek",
        "key_version": 1,
        "wrapped_dek": bytes(40),
    }
    stored: dict[str, bytes] = {}
    entries = []
    for index, (name, data) in enumerate((("model.onnx", graph), ("weights.bin", weights))):
        header = build_header(
            model_version=part_version("1", index),
            content_type="application/octet-stream",
            plaintext_size=len(data),
            **common,  # type: ignore[arg-type]
        )
        stored[header.model_version] = encrypt_bytes(data, body, header=header)
        entries.append(
            (
                name,
                header.content_type,
                len(data),
                hashlib.sha256(data).digest(),
                header_digest(header),
            )
        )
    manifest = build_manifest(
        model_name="canary/mp",
        model_version="1",
        layout=ManifestLayout.ONNX_EXTERNAL_DATA,
        parts=entries,
    ).encode()
    header = build_header(
        model_version="1",
        content_type=MANIFEST_CONTENT_TYPE,
        plaintext_size=len(manifest),
        **common,  # type: ignore[arg-type]
    )
    stored["1"] = encrypt_bytes(manifest, body, header=header)

    def source(_name: str, version: str) -> Iterator[bytes]:
        data = stored[version]
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]

    def release(_key_id: str, _key_version: int, _wrapped: bytes) -> ReleasedDataKey:
        return ReleasedDataKey(bytearray(dek), 0, "probe", "probe")

    return ModelFetcher(source, release, parallel=2)


def main() -> dict[str, object]:
    canary = bytes.fromhex(os.environ["CANARY_HEX"])
    if os.environ.get("PROBE_MODE") == "unsafe":
        original = loaded_module.session_options

        def leaky(options: RuntimeOptions) -> ort.SessionOptions:
            so = original(options)
            so.optimized_model_filepath = os.path.join(os.getcwd(), "optimized.onnx")
            return so

        loaded_module.session_options = leaky
    table = _table(canary)
    model = bytearray(onnx_models.lookup(table))
    assert canary in model
    graph, weights = onnx_models.lookup_external(table)
    indices = np.array([0, 1, 2, 3])
    results = []
    single = LoadedModel.from_bytes("single", "1", model)
    results.append(single.infer({"indices": indices})["y"])
    external = LoadedModel.from_bytes(
        "external", "1", graph, external_data={"weights.bin": bytearray(weights)}
    )
    results.append(external.infer({"indices": indices})["y"])
    multipart = ModelRepository(["canary/mp"])
    load_multipart(multipart, _multipart_fetcher(bytes(graph), bytes(weights)), "canary/mp", "1")
    results.append(multipart.get("canary/mp").infer({"indices": indices})["y"])
    repository = ModelRepository(["served"])
    repository.load("served", "1", model)
    results.append(repository.get("served").infer({"indices": indices})["y"])
    # Bitwise: the canary's random bytes may read as NaN, which never equals itself.
    expected = table[:4].tobytes()
    return {
        "outputs_ok": all(np.asarray(r, dtype="<f4").tobytes() == expected for r in results),
        "writable_fds": _writable_file_descriptors(),
    }


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
