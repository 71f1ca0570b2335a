"""``strongroom inference load | unload | status | evidence``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from google.protobuf.json_format import MessageToDict

from strongroom.api.attestation.v1 import evidence_pb2
from strongroom.api.inference.v1 import attestation_pb2 as att_pb
from strongroom.api.inference.v1 import attestation_pb2_grpc as att_grpc
from strongroom.api.inference.v1 import model_control_pb2 as pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as pb_grpc
from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from strongroom.cli._pins import add_header_pin_argument
from strongroom.cli.client import Client, add_client_arguments

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
        "evidence", help="fetch the server's attestation evidence bound to a fresh nonce"
    )
    add_client_arguments(evidence)
    evidence.set_defaults(func=_evidence)


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
            },
            indent=2,
        )
    )
    return 0
