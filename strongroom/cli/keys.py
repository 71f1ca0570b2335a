"""``strongroom keys …`` (key lifecycle and release policies, admin identity) and ``strongroom audit``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.cli._text import printable, printable_document
from strongroom.cli.client import Client, add_client_arguments
from strongroom.client.rewrap import KeyVersionUse, models_needing, rewrap_models
from strongroom.errors import FailedPrecondition, InvalidArgument, NotFound
from strongroom.identifiers import MAX_KEY_VERSION
from strongroom.reasons import Reason
from strongroom.runtime.config import ConfigError

TIMEOUT = 30.0


def register(sub: Any) -> None:
    """Adds ``keys`` and ``audit``."""
    keys = sub.add_parser("keys", help="manage key-encryption keys and release policies (admin)")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    def action(
        name: str, help_text: str, func: Any, *, key: bool = True
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        add_client_arguments(parser)
        if key:
            parser.add_argument("key_id")
        parser.set_defaults(func=func)
        return parser

    action("create", "create a KEK (AES-256 in the HSM, never extractable)", _create)
    action("list", "list KEKs and their versions", _list, key=False)
    rotate = action("rotate", "add a new KEK version (old versions still unwrap)", _rotate)
    rotate.add_argument(
        "--rewrap-models",
        action="store_true",
        help="then re-wrap every stored model's data key to the new version (see rewrap-models)",
    )
    action(
        "rewrap-models",
        "re-wrap every stored model under the key to its current version (resumable)",
        _rewrap_models,
    )
    disable = action(
        "disable",
        "disable one version (or all) of a KEK; refused while stored models still need it",
        _disable,
    )
    # Which versions is never a default: a disabled version cannot be enabled again, and an
    # omitted --version used to retire every version of the key.
    which = disable.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=_key_version, help="the version to disable")
    which.add_argument(
        "--all-versions",
        dest="version",
        action="store_const",
        const=0,  # DisableKeyRequest.version 0: every version
        help="disable every version of the key",
    )
    disable.add_argument(
        "--force",
        action="store_true",
        help="disable without checking the model store (its models under that version can no "
        "longer be loaded)",
    )
    disable.add_argument(
        "--ignore-corrupt",
        action="store_true",
        help="check the model store, but disable even though it lists index entries it cannot "
        "read (INDEX_CORRUPT), once you have checked that none of them needs the version",
    )
    set_policy = action(
        "set-policy", "attach a release policy document (YAML or JSON)", _set_policy
    )
    set_policy.add_argument("policy_file", type=Path)
    expected = set_policy.add_mutually_exclusive_group()
    expected.add_argument(
        "--if-version",
        metavar="VERSION",
        dest="if_version",
        type=_expected_version,
        help="replace the key's policy only while it is still at VERSION (the one get-policy "
        "showed): refused POLICY_CHANGED, naming the live version, if it changed meanwhile",
    )
    expected.add_argument(
        "--if-no-policy",
        dest="if_version",
        action="store_const",
        const="",
        help="set the key's policy only while it has none (refused POLICY_CHANGED otherwise)",
    )
    action("get-policy", "print a key's release policy", _get_policy)


def _expected_version(text: str) -> str:
    """``--if-version``: a policy version is never empty; "no policy yet" is ``--if-no-policy``."""
    if not text:
        raise argparse.ArgumentTypeError("a policy version is not empty (use --if-no-policy)")
    return text


def _key_version(text: str) -> int:
    """``--version``: 0 (every version) or a KEK version. A value outside the request's range
    is a usage error here: building the request raised ValueError, a traceback."""
    try:
        version = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= version <= MAX_KEY_VERSION:
        raise argparse.ArgumentTypeError(
            f"{version} is not a key version (1..{MAX_KEY_VERSION}, or 0 for all)"
        )
    return version


def _admin(args: argparse.Namespace) -> tuple[Client, pb_grpc.KeyAdminServiceStub]:
    client = Client.from_args(args)
    return client, pb_grpc.KeyAdminServiceStub(client.channel("keybroker"))


def _print(message: Any) -> int:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))
    return 0


def _create(args: argparse.Namespace) -> int:
    client, stub = _admin(args)
    with client:
        return _print(stub.CreateKey(pb.CreateKeyRequest(key_id=args.key_id), timeout=TIMEOUT).key)


def _list(args: argparse.Namespace) -> int:
    client, stub = _admin(args)
    with client:
        return _print(pb.ListKeysResponse(keys=list(_all_keys(stub))))


def _all_keys(stub: pb_grpc.KeyAdminServiceStub) -> Iterator[pb.KeyInfo]:
    """Every key, page after page; stops if the broker's page token does not advance."""
    token = ""
    while True:
        page = stub.ListKeys(pb.ListKeysRequest(page_token=token), timeout=TIMEOUT)
        yield from page.keys
        if not page.next_page_token:
            return
        if page.next_page_token <= token:
            raise FailedPrecondition(
                "the key broker's key listing does not advance; stopped",
                reason=Reason.KEY_LISTING_LOOPS,
            )
        token = page.next_page_token


def _rotate(args: argparse.Namespace) -> int:
    client, stub = _admin(args)
    with client:
        key = stub.RotateKey(pb.RotateKeyRequest(key_id=args.key_id), timeout=TIMEOUT).key
        _print(key)
        if not args.rewrap_models:
            return 0
        return _rewrap(client, args.key_id, key.current_version)


def _rewrap_models(args: argparse.Namespace) -> int:
    client, stub = _admin(args)
    with client:
        key = next((k for k in _all_keys(stub) if k.key_id == args.key_id), None)
        if key is None:
            raise NotFound(f"key {args.key_id} does not exist", reason=Reason.KEY_NOT_FOUND)
        return _rewrap(client, args.key_id, key.current_version)


def _rewrap(client: Client, key_id: str, current_version: int) -> int:
    """Streams one JSON line per stored model, then a summary; exit 1 if any model failed (one
    deleted during the run is ``gone``, not a failure) or the store listed index entries it
    cannot read (``corrupt``, after every readable model: each may still need an old version)."""
    counts: Counter[str] = Counter()
    corrupt: list[str] = []
    for result in rewrap_models(
        key_id,
        current_version=current_version,
        broker=client.channel("keybroker"),
        store=client.channel("modelstore"),
    ):
        counts[result.outcome] += 1
        if result.outcome == "corrupt":
            corrupt.append(f"{printable(result.name)} {printable(result.version)}")
        line = dataclasses.asdict(result)
        if not result.problem:
            del line["problem"]  # only a corrupt entry has one: the other lines are as before
        print(json.dumps(line), flush=True)
    print(json.dumps({"key_id": key_id, "current_version": current_version, **counts}))
    if corrupt:
        print(
            f"strongroom: {_first_ten(corrupt)}: index entr{'y' if len(corrupt) == 1 else 'ies'} "
            "the model store cannot read (INDEX_CORRUPT), not re-wrapped and possibly still "
            "under an older version of the key; restore them from a backup or delete them "
            "(strongroom model rm), then run strongroom keys rewrap-models again",
            file=sys.stderr,
        )
    return 1 if counts["failed"] or counts["corrupt"] else 0


def _first_ten(names: list[str]) -> str:
    """The first ten of ``names`` for a message, and how many more."""
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return ", ".join(names[:10]) + more


def _disable(args: argparse.Namespace) -> int:
    client, stub = _admin(args)
    with client:
        if not args.force:
            _check_unused(client, args.key_id, args.version, ignore_corrupt=args.ignore_corrupt)
        request = pb.DisableKeyRequest(key_id=args.key_id, version=args.version)
        _print(stub.DisableKey(request, timeout=TIMEOUT).key)
        if not args.force:
            # The check and the disable are two calls: an upload under the version that
            # completed between them (a data key obtained before the rotation) was missed, and
            # the store cannot refuse it. The version cannot be enabled again, so the least the
            # command can do is list the store once more and name what can no longer be loaded.
            _check_disabled_unused(client, args.key_id, args.version)
        return 0


def _store_use(client: Client, key_id: str, version: int, unlisted: str) -> KeyVersionUse:
    """What the model store holds that needs ``version`` of ``key_id`` (any if 0), corrupt
    entries included; ``unlisted`` goes to stderr if the store cannot be listed."""
    try:
        return models_needing(key_id, version, store=client.channel("modelstore"))
    except (grpc.RpcError, ConfigError):
        print(f"strongroom: {unlisted}", file=sys.stderr)
        raise


def _named_models(models: list[store_pb.ModelInfo]) -> str:
    return _first_ten(
        [f"{printable(m.name)} {printable(m.version)} (version {m.key_version})" for m in models]
    )


def _named_corrupt(entries: list[store_pb.CorruptEntry]) -> str:
    return _first_ten(
        [f"{printable(e.name)} {printable(e.version)} ({printable(e.problem)})" for e in entries]
    )


def _check_disabled_unused(client: Client, key_id: str, version: int) -> None:
    """After a disable: FAILED_PRECONDITION (KEY_VERSION_IN_USE) naming the stored models that
    need the now disabled ``version`` of ``key_id`` (any version if 0)."""
    which = f"version {version} of {key_id}" if version else f"every version of {key_id}"
    use = _store_use(
        client,
        key_id,
        version,
        f"{which} is disabled, but the model store could not be listed again to check that no "
        "model was published under it meanwhile",
    )
    if use.models:
        raise FailedPrecondition(
            f"{which} is disabled, but {len(use.models)} stored model(s) published under it "
            f"while it was being disabled can no longer be loaded: {_named_models(use.models)}; "
            "re-publish them",
            reason=Reason.KEY_VERSION_IN_USE,
        )


def _check_unused(client: Client, key_id: str, version: int, *, ignore_corrupt: bool) -> None:
    """Refuses (FAILED_PRECONDITION, KEY_VERSION_IN_USE) while the model store holds models under
    ``version`` of ``key_id`` (any version if 0), or, unless ``ignore_corrupt``, index entries it
    cannot read (their key unknown, any may be under it): a disabled version cannot be enabled
    again. The corrupt entries were a listing error before, which stopped this check; a store
    that answers a listing around them must not let them pass unseen either."""
    which = f"version {version} of {key_id}" if version else f"a version of {key_id}"
    use = _store_use(
        client,
        key_id,
        version,
        f"cannot list the model store to check which models still need {which}; --force "
        "disables without the check",
    )
    if use.models:
        remedy = (
            f"re-wrap them first (strongroom keys rewrap-models {key_id}; format-1 models must be "
            "re-published)"
            if version
            else "delete or re-publish them under another key first"
        )
        raise FailedPrecondition(
            f"{len(use.models)} stored model(s) still need {which} and could not be loaded once "
            f"it is disabled: {_named_models(use.models)}; {remedy}, or pass --force",
            reason=Reason.KEY_VERSION_IN_USE,
        )
    if use.corrupt and not ignore_corrupt:
        raise FailedPrecondition(
            f"the model store lists {len(use.corrupt)} index entr"
            f"{'y' if len(use.corrupt) == 1 else 'ies'} it cannot read (INDEX_CORRUPT), any of "
            f"which might still need {which} and could not be loaded once it is disabled: "
            f"{_named_corrupt(use.corrupt)}; restore them from a backup or delete them "
            "(strongroom model rm) first, or pass --ignore-corrupt once you have checked that "
            "none of them needs it",
            reason=Reason.KEY_VERSION_IN_USE,
        )


def _set_policy(args: argparse.Namespace) -> int:
    try:
        # As stored (newline=""): universal newlines sent a CRLF file in its LF form, another
        # document (and SHA-256) than the file the admin set; the same file put in the policy
        # directory by deployment tooling was then refused POLICY_VERSION_REUSED.
        with args.policy_file.open(encoding="utf-8", newline="") as file:
            document = file.read()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {args.policy_file}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        # A policy document is UTF-8 (the request's field is a string); an editor's UTF-16 or
        # Latin-1 file raised this, which the command line does not catch: a traceback.
        raise InvalidArgument(
            f"{args.policy_file} is not UTF-8 text (byte {exc.start}); save it as UTF-8",
            reason=Reason.POLICY_SYNTAX,
        ) from None
    client, stub = _admin(args)
    with client:
        request = pb.SetReleasePolicyRequest(key_id=args.key_id, policy_document=document)
        if args.if_version is not None:  # "" (--if-no-policy) is a compare-and-swap too
            request.expected_policy_version = args.if_version
        return _print(stub.SetReleasePolicy(request, timeout=TIMEOUT))


def _get_policy(args: argparse.Namespace) -> int:
    client, stub = _admin(args)
    with client:
        response = stub.GetReleasePolicy(
            pb.GetReleasePolicyRequest(key_id=args.key_id), timeout=TIMEOUT
        )
        # Both are the broker's text: escaped, so that a broker that is not what it should be
        # cannot drive the terminal nor forge the line naming the version --if-version is given.
        document = printable_document(response.policy_document)
        # A byte order mark (a Windows editor's) may only open a YAML stream: printed after the
        # version line, the output an admin saves, edits and sets again was no YAML at all.
        bom = "\ufeff" if document.startswith("\ufeff") else ""
        print(f"{bom}# policy version {printable(response.policy_version)}")
        print(document[len(bom) :])
    return 0
