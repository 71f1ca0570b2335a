"""``strongroom model publish | ls | inspect | rm``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import read_summary
from strongroom.cli.client import Client, add_client_arguments
from strongroom.client.publish import ONNX_CONTENT_TYPE, publish_model
from strongroom.errors import FailedPrecondition

TIMEOUT = 30.0


def register(sub: Any) -> None:
    """Adds the ``model`` command group."""
    model = sub.add_parser("model", help="publish and manage encrypted models")
    actions = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    publish = actions.add_parser("publish", help="encrypt a model at birth and upload it")
    add_client_arguments(publish)
    publish.add_argument("file", type=Path)
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
    publish.set_defaults(func=_publish)

    ls = actions.add_parser("ls", help="list stored models")
    add_client_arguments(ls)
    ls.add_argument("prefix", nargs="?", default="")
    ls.set_defaults(func=_ls)

    inspect = actions.add_parser("inspect", help="show an artifact's header (no key needed)")
    inspect.add_argument("artifact", type=Path, help="a local artifact file")
    inspect.set_defaults(func=_inspect)

    rm = actions.add_parser("rm", help="delete a stored model version (admin)")
    add_client_arguments(rm)
    rm.add_argument("name")
    rm.add_argument("version")
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


def _publish(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise FailedPrecondition(f"{args.file} is not a file", reason="MODEL_FILE_UNREADABLE")
    bar = None if args.no_progress else ProgressBar()
    with Client.from_args(args) as client:
        published = publish_model(
            args.file,
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
    info = published.model
    print(
        json.dumps(
            {
                "name": info.name,
                "version": info.version,
                "artifact_sha256": info.artifact_sha256,
                "artifact_size": info.artifact_size,
                "key_id": info.key_id,
                "key_version": info.key_version,
                "seconds": round(published.seconds, 3),
            },
            indent=2,
        )
    )
    return 0


def _ls(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        stub = pb_grpc.ModelStoreServiceStub(client.channel("modelstore"))
        token = ""
        while True:
            page = stub.ListModels(
                pb.ListModelsRequest(name_prefix=args.prefix, page_token=token), timeout=TIMEOUT
            )
            for m in page.models:
                print(
                    f"{m.name}\t{m.version}\t{m.artifact_size}\t{m.artifact_sha256}\t{m.key_id}/v{m.key_version}"
                )
            token = page.next_page_token
            if not token:
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
    print(json.dumps(out, indent=2))
    return 0


def _rm(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        stub = pb_grpc.ModelStoreServiceStub(client.channel("modelstore"))
        stub.DeleteModel(
            pb.DeleteModelRequest(name=args.name, version=args.version), timeout=TIMEOUT
        )
    print(f"deleted {args.name}/{args.version}")
    return 0
