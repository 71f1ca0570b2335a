"""``strongroom model publish | upload | fetch | ls | inspect | rm``."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import FORMAT_V3, read_summary
from strongroom.artifact.manifest import ManifestLayout
from strongroom.attestation.release_signature import ReleaseVerifier
from strongroom.attesters import select_attester
from strongroom.cli._pins import add_header_pin_argument
from strongroom.cli._text import printable
from strongroom.cli.client import Client, add_client_arguments
from strongroom.client.busy import CLIENT_RETRY
from strongroom.client.fetch import DecryptedModel, ModelFetcher
from strongroom.client.keyrelease import KeyReleaseClient
from strongroom.client.listing import iter_entries
from strongroom.client.multipart import (
    CHECK_SECONDS,
    PartFile,
    files_parts,
    onnx_parts,
    publish_parts,
)
from strongroom.client.publish import (
    ONNX_CONTENT_TYPE,
    Published,
    publish_model,
    upload_artifact,
)
from strongroom.errors import FailedPrecondition
from strongroom.identifiers import MAX_NAME_LENGTH
from strongroom.reasons import Reason
from strongroom.runtime.log_writer import write_at_once

TIMEOUT = 30.0


def register(sub: Any) -> None:
    """Adds the ``model`` command group."""
    model = sub.add_parser("model", help="publish and manage encrypted models")
    actions = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    publish = actions.add_parser("publish", help="encrypt a model at birth and upload it")
    add_client_arguments(publish)
    publish.add_argument(
        "file",
        type=Path,
        nargs="+",
        help="an ONNX file (with or without external data), a directory holding one ONNX model "
        "and its external-data files, or files/a directory of shards (published as named parts)",
    )
    publish.add_argument("--name", required=True)
    publish.add_argument("--version", required=True)
    publish.add_argument(
        "--key-id", required=True, help="the KEK to wrap the model's data key under"
    )
    publish.add_argument("--content-type", default=ONNX_CONTENT_TYPE)
    publish.add_argument("--no-progress", action="store_true")
    publish.add_argument(
        "--sign-key",
        type=Path,
        help="EC private key (PEM file) to sign the model with OpenSSF model-signing",
    )
    publish.add_argument(
        "--check-within",
        type=_positive_seconds,
        default=CHECK_SECONDS,
        metavar="SECONDS",
        help="multi-part: how long in all the look for parts a failed publish left may take "
        f"before any data key is asked for (default {CHECK_SECONDS:g}; raise it for a slow store "
        "and thousands of parts)",
    )
    publish.set_defaults(func=_publish)

    fetch = actions.add_parser(
        "fetch",
        help="inside the confidential VM: attest, release and decrypt a model into a pipe",
    )
    add_client_arguments(fetch)
    fetch.add_argument("name")
    fetch.add_argument("version")
    fetch.add_argument(
        "--to-memory",
        action="store_true",
        required=True,
        help="write the plaintext to standard output, which must be a pipe or socket (never a "
        "file): one part raw with --part, else every part as an uncompressed tar stream",
    )
    fetch.add_argument("--part", help="the one part to write (default: all, as tar)")
    fetch.add_argument(
        "--attester",
        default="auto",
        choices=("auto", "configfs-tsm", "sev-guest", "tdx-guest"),
        help="how to obtain this VM's attestation report",
    )
    add_header_pin_argument(fetch, "this command")
    fetch.add_argument(
        "--accept-unbound",
        action="store_true",
        help="also accept a format-1 or -2 artifact, whose data key is not bound to its model "
        "(anyone who ever held a data key of its KEK could have written it): only while "
        "re-publishing such models",
    )
    fetch.set_defaults(func=_fetch)

    upload = actions.add_parser(
        "upload",
        help="upload an already encrypted artifact file unchanged (e.g. one from the store's "
        "quarantine); its name and version are its header's",
    )
    add_client_arguments(upload)
    upload.add_argument("artifact", type=Path, help="a local artifact file")
    upload.add_argument("--no-progress", action="store_true")
    upload.set_defaults(func=_upload)

    ls = actions.add_parser(
        "ls",
        help="list stored models: name, version, size, SHA-256, key id/version, artifact format",
    )
    add_client_arguments(ls)
    ls.add_argument("prefix", nargs="?", default="")
    ls.add_argument(
        "--unbound",
        action="store_true",
        help="only the models to re-publish: artifact format 1 or 2, whose data key is not bound "
        "to the model (and any whose format the store does not know)",
    )
    ls.set_defaults(func=_ls)

    inspect = actions.add_parser("inspect", help="show an artifact's header (no key needed)")
    inspect.add_argument("artifact", type=Path, help="a local artifact file")
    inspect.set_defaults(func=_inspect)

    rm = actions.add_parser("rm", help="delete a stored model version (admin)")
    add_client_arguments(rm)
    rm.add_argument("name")
    rm.add_argument("version")
    rm.add_argument(
        "--corrupt",
        action="store_true",
        help="delete the index entry the store cannot read that `model ls` lists as CORRUPT "
        "under NAME VERSION, exactly as listed (even outside the name grammar); its blob is kept",
    )
    rm.set_defaults(func=_rm)


class ProgressBar:
    """A one-line progress bar with throughput, on a terminal (or every 10% elsewhere)."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self._out = out
        self._start = time.perf_counter()
        self._last = -1.0
        self._tty = out.isatty()

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        if not self._tty and fraction < 1.0 and fraction - self._last < 0.1:
            return
        self._last = fraction
        elapsed = max(time.perf_counter() - self._start, 1e-6)
        bar = "#" * int(fraction * 30)
        line = f"[{bar:<30}] {fraction:6.1%}  {done / 2**20:9.1f} MiB  {done / elapsed / 2**20:8.1f} MiB/s"
        self._out.write(("\r" if self._tty else "") + line + ("" if self._tty else "\n"))
        self._out.flush()

    def done(self) -> None:
        """Ends the line."""
        if self._tty:
            self._out.write("\n")


def _plan(paths: list[Path]) -> tuple[list[PartFile], ManifestLayout] | None:
    """The parts to publish, or None for one plain file (the single-artifact path)."""
    for path in paths:
        if not path.exists():
            raise FailedPrecondition(f"{path} does not exist", reason=Reason.MODEL_FILE_UNREADABLE)
    if len(paths) == 1:
        path = paths[0]
        onnx_model = path.suffix == ".onnx" or (
            path.is_dir() and any(p.suffix == ".onnx" for p in path.iterdir())
        )
        if onnx_model:
            parts = onnx_parts(path)
            if len(parts) > 1:
                return parts, ManifestLayout.ONNX_EXTERNAL_DATA
            return None if path.is_file() else ([parts[0]], ManifestLayout.ONNX_EXTERNAL_DATA)
        if path.is_file():
            return None
    parts = files_parts(paths)
    if not parts:
        raise FailedPrecondition("no files to publish", reason=Reason.MODEL_FILE_UNREADABLE)
    return parts, ManifestLayout.FILES


def _positive_seconds(text: str) -> float:
    """A number of seconds above 0 and finite: NaN or infinity would make no bound at all (every
    comparison with it false), 0 or less one that refuses every publish."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


@contextmanager
def _interrupt_notes_printed(bar: ProgressBar | None) -> Iterator[None]:
    """Ctrl-C ends the command (status 130) at once; what it may have left in the store, and
    the commands that remove it, are the publisher's notes on the interrupt, printed here as
    the command's error line is (:func:`~strongroom.runtime.log_writer.write_at_once`): printed
    blocking, a note waited for good on a full stderr pipe whose collector had stopped reading,
    and the interrupted command never ended."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        if bar is not None:
            bar.done()
        for note in getattr(interrupt, "__notes__", ()):
            write_at_once(sys.stderr, f"strongroom: {note}", cut_to_fit=True)
        raise


def _publish(args: argparse.Namespace) -> int:
    plan = _plan(args.file)
    if plan is not None and args.sign_key is not None:
        raise FailedPrecondition(
            "signing covers one file; multi-part models cannot be signed yet",
            reason=Reason.SIGNING_UNSUPPORTED,
        )
    bar = None if args.no_progress else ProgressBar()
    if plan is not None:
        parts, layout = plan
        with Client.from_args(args) as client, _interrupt_notes_printed(bar):
            stored = publish_parts(
                parts,
                name=args.name,
                version=args.version,
                key_id=args.key_id,
                broker=client.channel("keybroker"),
                store=client.channel("modelstore"),
                layout=layout,
                progress=bar,
                check_within=args.check_within,
            )
        if bar is not None:
            bar.done()
        info = stored.manifest
        print(
            json.dumps(
                {
                    "name": info.name,
                    "version": info.version,
                    "layout": layout.name,
                    "parts": [
                        {"name": p.name, "store_version": s.version, "size": s.plaintext_size}
                        for p, s in zip(parts, stored.parts, strict=True)
                    ],
                    "key_id": info.key_id,
                    "key_version": info.key_version,
                    "header_sha256": stored.header_sha256,
                    "seconds": round(stored.seconds, 3),
                },
                indent=2,
            )
        )
        return 0
    with Client.from_args(args) as client, _interrupt_notes_printed(bar):
        published = publish_model(
            args.file[0],
            name=args.name,
            version=args.version,
            key_id=args.key_id,
            broker=client.channel("keybroker"),
            store=client.channel("modelstore"),
            content_type=args.content_type,
            progress=bar,
            signing_key=args.sign_key,
        )
    if bar is not None:
        bar.done()
    _print_stored(published, seconds=round(published.seconds, 3))
    return 0


def _check_pipe(out: BinaryIO) -> None:
    """Refuses to write plaintext anywhere but a pipe or a socket (a redirect to a file, a tty)."""
    mode = os.fstat(out.fileno()).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        raise FailedPrecondition(
            "--to-memory writes plaintext only to a pipe or socket; standard output is not one",
            reason=Reason.OUTPUT_NOT_A_PIPE,
        )


def _write_tar(model: DecryptedModel, out: BinaryIO) -> None:
    """Every part as one uncompressed tar stream (pax headers), each part's bytes written straight
    from its decrypted buffer.

    Not through ``tarfile``'s writer: it copies what it is given into buffers of its own (and
    ``io.BytesIO`` over a part's view copies the whole part first), so every byte of plaintext
    would pass through memory that is freed without being wiped.
    """
    for part in model.parts:
        info = tarfile.TarInfo(part.name)
        info.size = part.size
        info.mode = 0o400
        out.write(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
        out.write(part.view)
        out.write(bytes(-part.size % tarfile.BLOCKSIZE))  # a member fills whole blocks
    out.write(bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive marker


def _fetch(args: argparse.Namespace, out: BinaryIO | None = None) -> int:
    out = out if out is not None else sys.stdout.buffer
    _check_pipe(out)
    with Client.from_args(args) as client:
        keys = client.config.keybroker_release_signing_public_keys
        if not keys:
            raise FailedPrecondition(
                "the client configuration has no keybroker_release_signing_public_keys: the key "
                "broker's release answer could not be told from any peer's holding a broker "
                "certificate (list the broker's release-signing-key.pub.pem)",
                reason=Reason.RELEASE_SIGNING_KEY_MISSING,
            )
        verifier = ReleaseVerifier.from_files(keys)
        attester = select_attester(args.attester, production=True)
        release = KeyReleaseClient(
            client.channel("keybroker"),
            attester,
            client.identity.public_key_der,
            verifier=verifier,
        )
        fetcher = ModelFetcher(
            client.channel("modelstore"),
            release,
            accept_unbound=args.accept_unbound,
            retry=CLIENT_RETRY,
        )
        with fetcher.fetch(args.name, args.version, header_sha256=args.header_sha256) as model:
            if args.part is not None:
                out.write(model.part(args.part).view)
            elif len(model.parts) == 1 and model.manifest is None:
                out.write(model.parts[0].view)
            else:
                _write_tar(model, out)
            out.flush()
    return 0


def _upload(args: argparse.Namespace) -> int:
    bar = None if args.no_progress else ProgressBar()
    with Client.from_args(args) as client, _interrupt_notes_printed(bar):
        published = upload_artifact(args.artifact, store=client.channel("modelstore"), progress=bar)
    if bar is not None:
        bar.done()
    _print_stored(published, artifact_format=published.model.artifact_format)
    return 0


def _print_stored(published: Published, **extra: object) -> None:
    """What the store recorded for a published artifact, and the digest readers pin it with."""
    info = published.model
    fields: dict[str, object] = {
        "name": info.name,
        "version": info.version,
        "artifact_sha256": info.artifact_sha256,
        "artifact_size": info.artifact_size,
        "key_id": info.key_id,
        "key_version": info.key_version,
    }
    print(json.dumps({**fields, **extra, "header_sha256": published.header_sha256}, indent=2))


def artifact_format_column(artifact_format: int) -> str:
    """``model ls``'s format column: ``format 3``; formats before 3 marked ``unbound`` (their data
    key opens any model: readers refuse them until they are re-published); 0 ``format unknown``
    (a store older than the field, or a record it could not fill in)."""
    if artifact_format == 0:
        return "format unknown"
    if artifact_format < FORMAT_V3:
        return f"format {artifact_format} unbound"
    return f"format {artifact_format}"


def _ls(args: argparse.Namespace) -> int:
    """One line per model; an index entry the store cannot read is listed too, in the same
    columns, marked ``CORRUPT`` (nothing but its name and version is known), and counted on
    stderr. Its format unknown, it is listed with ``--unbound`` too."""
    corrupt = 0
    with Client.from_args(args) as client:
        stub = pb_grpc.ModelStoreServiceStub(client.channel("modelstore"))
        for m in iter_entries(stub, name_prefix=args.prefix, timeout=TIMEOUT):
            if isinstance(m, pb.CorruptEntry):
                corrupt += 1
                print(
                    f"{printable(m.name)}\t{printable(m.version)}\t-\t-\t-\t"
                    f"CORRUPT {printable(m.reason)}: {printable(m.problem)}"
                )
                continue
            # Unknown counts as unbound: the filter is for finding what to re-publish.
            if args.unbound and m.artifact_format >= FORMAT_V3:
                continue
            fields = (m.name, m.version, m.artifact_size, m.artifact_sha256, m.key_id)
            print(
                "\t".join(map(printable, fields))
                + f"/v{m.key_version}\t{artifact_format_column(m.artifact_format)}"
            )
    if corrupt:
        print(
            f"strongroom: {corrupt} index entr{'y' if corrupt == 1 else 'ies'} marked CORRUPT: "
            "the store cannot read them (edited or damaged) and serves nothing from them; "
            "restore them from a backup or delete them (strongroom model rm)",
            file=sys.stderr,
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    try:
        stream = args.artifact.open("rb")
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {args.artifact}: {exc.strerror}") from None
    with stream:
        summary = read_summary(stream)
    out = {k: getattr(summary, k) for k in summary.__dataclass_fields__}
    out["created_at"] = summary.created_at.isoformat()
    out["wrapped_dek_mechanism"] = summary.wrapped_dek_mechanism.name
    # Formats 1 and 2 are refused by readers unless accepted while re-publishing them.
    out["data_key_bound_to_model"] = summary.format_version == FORMAT_V3
    print(json.dumps(out, indent=2))
    return 0


# The leading characters of a name that a ListModels name_prefix may hold.
_PREFIX_PART = re.compile(r"[A-Za-z0-9._/-]*")


def _corrupt_entry_printed_as(
    stub: pb_grpc.ModelStoreServiceStub, name: str, version: str
) -> tuple[str, str]:
    """The name and version of the one corrupt entry that ``model ls`` prints as ``name``
    ``version`` (each character that is not printable shown as its escape, :func:`printable`),
    or ``name`` ``version`` as given if none is (typed with the raw characters, or not listed:
    the store answers). Several printed alike: FailedPrecondition INDEX_ENTRY_AMBIGUOUS."""
    prefix = _PREFIX_PART.match(name)
    found = {
        (entry.name, entry.version)
        for entry in iter_entries(
            stub, name_prefix=prefix[0][:MAX_NAME_LENGTH] if prefix else "", timeout=TIMEOUT
        )
        if isinstance(entry, pb.CorruptEntry)
        and (printable(entry.name), printable(entry.version)) == (name, version)
    }
    if len(found) > 1:
        raise FailedPrecondition(
            f"{len(found)} corrupt index entries are listed as {printable(name)} "
            f"{printable(version)}: name one with its raw characters, or delete them from the "
            "index by hand",
            reason=Reason.INDEX_ENTRY_AMBIGUOUS,
        )
    return found.pop() if found else (name, version)


def _rm(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        stub = pb_grpc.ModelStoreServiceStub(client.channel("modelstore"))
        name, version = args.name, args.version
        if args.corrupt:
            # ``model ls`` escapes what is not printable (a planted name must not drive the
            # terminal): the entry as printed is found again, else it could not be named.
            name, version = _corrupt_entry_printed_as(stub, name, version)
        stub.DeleteModel(
            pb.DeleteModelRequest(name=name, version=version, corrupt_entry=args.corrupt),
            timeout=TIMEOUT,
        )
    what = "the corrupt index entry " if args.corrupt else ""
    print(f"deleted {what}{printable(args.name)}/{printable(args.version)}")
    return 0
