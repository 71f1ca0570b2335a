"""``strongroom inference load | unload | status | evidence``.

``evidence --verify COLLATERAL_DIR`` is what a client should do before sending a server data
(:mod:`strongroom.client.server_evidence`): fresh evidence, bound to our nonce and to the key the
server presents to us, verified against the pinned roots with our own collateral and, with
``--policy``, held to a release policy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from strongroom.api.attestation.v1 import evidence_pb2
from strongroom.api.inference.v1 import attestation_pb2 as att_pb
from strongroom.api.inference.v1 import attestation_pb2_grpc as att_grpc
from strongroom.api.inference.v1 import model_control_pb2 as pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as pb_grpc
from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from strongroom.attestation import TrustStore
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.errors import PolicyInvalid
from strongroom.attestation.policy import ReleasePolicy
from strongroom.cli._pins import add_header_pin_argument
from strongroom.cli.client import Client, add_client_arguments
from strongroom.client.server_evidence import verify_inference_server
from strongroom.errors import InvalidArgument
from strongroom.files import read_file
from strongroom.keybroker.policy_bounds import check_policy_bounds
from strongroom.reasons import Reason

TIMEOUT = 600.0


def register(sub: Any) -> None:
    """Adds the ``inference`` command group."""
    inference = sub.add_parser("inference", help="operate an inference server")
    actions = inference.add_subparsers(dest="inference_command", metavar="ACTION", required=True)
    for name, help_text, func in (
        (
            "load",
            "fetch, attest, release, decrypt in memory and serve a model version (admin)",
            _load,
        ),
        ("unload", "stop serving a model version (admin)", _unload),
        ("status", "readiness and metadata of a model", _status),
    ):
        parser = actions.add_parser(name, help=help_text)
        add_client_arguments(parser)
        parser.add_argument("name")
        parser.add_argument("version", nargs="?" if name != "load" else None, default="")
        if name == "load":
            add_header_pin_argument(parser, "the inference server")
        parser.set_defaults(func=func)
    evidence = actions.add_parser(
        "evidence",
        help="fetch the server's attestation evidence bound to a fresh nonce and, with --verify, "
        "check it",
    )
    add_client_arguments(evidence)
    evidence.add_argument(
        "--verify",
        type=Path,
        metavar="COLLATERAL_DIR",
        help="verify the evidence against the pinned AMD/Intel roots, judged with the collateral "
        "cache in COLLATERAL_DIR (`strongroom attest collateral fetch`), and check that it binds "
        "our nonce and the TLS key the server presents to us",
    )
    evidence.add_argument(
        "--policy",
        type=Path,
        help="with --verify: a release policy (YAML) the server must satisfy for its SPIFFE ID, "
        "e.g. the one its model's key is released under",
    )
    evidence.add_argument(
        "--simulated-tee-dir",
        type=Path,
        help="with --verify, development only: also trust the simulated TEE chain in this "
        "directory (a policy must then be a development policy)",
    )
    evidence.set_defaults(func=_evidence, parser=evidence)


def _load(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        stub = pb_grpc.ModelControlServiceStub(client.channel("inference"))
        pin = args.header_sha256.hex() if args.header_sha256 is not None else ""
        response = stub.LoadModel(
            pb.LoadModelRequest(name=args.name, version=args.version, header_sha256=pin),
            timeout=TIMEOUT,
        )
    print(json.dumps(MessageToDict(response, preserving_proto_field_name=True), indent=2))
    return 0


def _unload(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        stub = pb_grpc.ModelControlServiceStub(client.channel("inference"))
        stub.UnloadModel(pb.UnloadModelRequest(name=args.name, version=args.version), timeout=60)
    print(f"unloaded {args.name}{'/' + args.version if args.version else ''}")
    return 0


def _status(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        stub = oip_grpc.GRPCInferenceServiceStub(client.channel("inference"))
        ready = stub.ModelReady(
            oip_pb.ModelReadyRequest(name=args.name, version=args.version), timeout=30
        )
        out: dict[str, Any] = {"ready": ready.ready}
        if ready.ready:
            meta = stub.ModelMetadata(
                oip_pb.ModelMetadataRequest(name=args.name, version=args.version), timeout=30
            )
            out["metadata"] = MessageToDict(meta, preserving_proto_field_name=True)
    print(json.dumps(out, indent=2))
    return 0 if ready.ready else 1


def _evidence(args: argparse.Namespace) -> int:
    if args.verify is None:
        if args.policy is not None or args.simulated_tee_dir is not None:
            args.parser.error("--policy and --simulated-tee-dir need --verify COLLATERAL_DIR")
        return _print_evidence(args)
    if not args.verify.is_dir():
        # A cache that does not exist reads as an empty one: every check would then fail
        # COLLATERAL_MISSING naming a CRL, not the mistyped path.
        raise InvalidArgument(
            f"--verify {args.verify}: no such collateral directory (make one with `strongroom "
            "attest collateral fetch` or `import`)",
            reason=Reason.COLLATERAL_MISSING,
        )
    development = args.simulated_tee_dir is not None
    trust = TrustStore.production()
    if development:
        trust = _with_simulated_roots(trust, args.simulated_tee_dir)
    policy = None
    if args.policy is not None:
        policy = _load_policy(args.policy, production=not development)
    with Client.from_args(args) as client, client.server_connection("inference") as connection:
        # The evidence travels over the very connection whose key it must bind.
        verified = verify_inference_server(
            connection,
            trust=trust,
            collateral=CollateralCache(args.verify, trust, writable=False),
            policy=policy,
            timeout=60,
        )
    out = {
        "nonce": verified.nonce.hex(),
        "tls_public_key_sha256": verified.tls_public_key_sha256.hex(),
        "trust": "development: simulated TEE chain trusted" if development else "production",
        "claims": verified.claims.as_dict(),
        "policy": verified.decision.as_dict() if verified.decision is not None else None,
    }
    print(json.dumps(out, indent=2))  # without --policy, verify_inference_server warned
    return 0


def _load_policy(path: Path, *, production: bool) -> ReleasePolicy:
    try:
        document = read_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyInvalid(f"{path} is not UTF-8 text", reason=Reason.POLICY_SYNTAX) from None
    # The key broker's bounds, before the loader: a document nested thousands deep made PyYAML
    # recurse until RecursionError (a traceback here), and costs time quadratic in its depth.
    check_policy_bounds(document)
    return ReleasePolicy.load(document, production=production)


def _with_simulated_roots(trust: TrustStore, directory: Path) -> TrustStore:
    try:
        return trust.with_simulated_roots(
            amd=[read_file(directory / "amd_trust.pem")],
            intel=[read_file(directory / "intel_root.pem")],
        )
    except ValueError as exc:
        # A certificate without the simulated-TEE marking (a real root, another directory): the
        # operator's mistake, one line, not a traceback.
        raise InvalidArgument(
            f"--simulated-tee-dir {directory}: {exc}", reason=Reason.BAD_CERTIFICATE
        ) from None


def _print_evidence(args: argparse.Namespace) -> int:
    nonce = os.urandom(32)
    with Client.from_args(args) as client:
        stub = att_grpc.InferenceAttestationServiceStub(client.channel("inference"))
        response = stub.GetEvidence(att_pb.GetEvidenceRequest(nonce=nonce), timeout=60)
    print(
        json.dumps(
            {
                "nonce": nonce.hex(),
                "tee_type": evidence_pb2.TeeType.Name(response.evidence.tee_type),
                "report": response.evidence.report.hex(),
                "report_data": response.report_data.hex(),
                "tls_public_key_sha256": response.tls_public_key_sha256.hex(),
                "verified": False,
            },
            indent=2,
        )
    )
    print(
        "strongroom: the evidence is NOT verified (pass --verify COLLATERAL_DIR)", file=sys.stderr
    )
    return 0
