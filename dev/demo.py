"""``strongroom demo``: the whole lifecycle on loopback, each step with what was checked.

It starts a real step-ca, a SoftHSM2 token, the key broker, the model store and the inference
service (with the simulated TEE) as separate processes, trains and publishes a small model, serves
it from the "confidential VM", and then shows the refusals: a VM whose measurement is not in the
release policy, and a tampered artifact.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from strongroom.errors import StrongroomError

KEY_ID = "demo-classifier"
MODEL = "classifier"


def register(sub: Any) -> None:
    """Adds ``demo``."""
    demo = sub.add_parser(
        "demo", help="run the whole lifecycle locally (step-ca, SoftHSM2, simulated TEE)"
    )
    demo.add_argument(
        "--dir",
        type=Path,
        default=Path(".build/demo"),
        help="working directory (recreated each run)",
    )
    demo.add_argument("--keep", action="store_true", help="leave the services running until Ctrl-C")
    demo.set_defaults(func=run)


class Narrator:
    """Prints numbered steps and the checks made in each."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.checks = 0

    def step(self, number: str, title: str) -> None:
        print(f"\n=== {number}. {title}", flush=True)

    def check(self, text: str) -> None:
        self.checks += 1
        print(f"  ✔ {text}", flush=True)

    def info(self, text: str) -> None:
        print(f"    {text}", flush=True)

    def refused(self, text: str) -> None:
        self.checks += 1
        print(f"  ✘ refused, as it must be: {text}", flush=True)


def _expect_failure(fn: Callable[[], object]) -> str:
    try:
        fn()
    except grpc.RpcError as exc:
        return f"{exc.code().name} {exc.details()}"
    except StrongroomError as exc:
        return f"{exc.status_name} {exc}"
    raise AssertionError("the operation should have been refused")


def run(args: argparse.Namespace) -> int:
    """Runs the demo; returns 0 when every step behaved as expected."""
    # Imported here so that `strongroom --help` stays fast.
    from strongroom.api.inference.v1 import attestation_pb2 as att_pb
    from strongroom.api.inference.v1 import attestation_pb2_grpc as att_grpc
    from strongroom.api.inference.v1 import model_control_pb2 as control_pb
    from strongroom.api.inference.v1 import model_control_pb2_grpc as control_grpc
    from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
    from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
    from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
    from strongroom.api.oip.v2 import grpc_service_pb2_grpc as oip_grpc
    from strongroom.artifact import read_summary
    from strongroom.attestation import Evidence, verify_evidence
    from strongroom.attestation.binding import check_report_data, client_report_data_for
    from strongroom.attestation.collateral_cache import CollateralCache
    from strongroom.client.publish import publish_model
    from strongroom.dev.devstack import DevStack
    from strongroom.dev.devstack.model import train
    from strongroom.dev.devstack.stack import DEMO_MEASUREMENT
    from strongroom.dev.simulated import SimulatedAuthority

    say = Narrator()
    root = args.dir.resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    stack = DevStack(root)
    try:
        say.step("0", "Bring up the platform: internal PKI, HSM, key broker, model store")
        ca = stack.start_ca()
        say.check(
            f"step-ca is serving at {ca.url} (root and intermediate CA, JWK provisioner, short-lived certificates)"
        )
        stack.init_hsm()
        say.check(
            "SoftHSM2 token initialised (development HSM; PINs typed at a prompt, never on argv)"
        )
        stack.init_simulated_tee()
        say.check(
            "simulated TEE chain generated (marked NOT FOR PRODUCTION; trusted only in development mode)"
        )
        for service in ("keybroker", "modelstore"):
            running = stack.start_process(service)
            say.check(
                f"{service} enrolled with a one-time token and serves mTLS on {running.address} (logs: {stack.log_path(service)})"
            )
        admin, publisher, client = (stack.identity(r) for r in ("admin", "publisher", "client"))
        say.check(
            f"operator identities enrolled: {admin.spiffe_id}, {publisher.spiffe_id}, {client.spiffe_id}"
        )

        info = stack.create_release_key(admin, KEY_ID, policy_version="demo-1")
        say.check(
            f"KEK {KEY_ID!r} v{info.current_version} created inside the HSM (AES-256, sensitive, never extractable)"
        )
        say.check(
            f"release policy demo-1: only {stack.spiffe_id('inference')} in an SEV-SNP VM measuring {DEMO_MEASUREMENT[:16]}…, debug off, VMPL 0"
        )

        say.step("1", "Train → plaintext model.onnx")
        workdir = root / "publisher"
        workdir.mkdir()
        model = train(workdir / "model.onnx")
        say.check(
            f"softmax classifier trained (accuracy {model.accuracy:.1%}), exported to ONNX ({model.path.stat().st_size} bytes)"
        )

        say.step("2", "Encrypt at birth and upload (strongroom model publish)")
        published = publish_model(
            model.path,
            name=MODEL,
            version="1",
            key_id=KEY_ID,
            broker=stack.channel(publisher, "keybroker"),
            store=stack.channel(publisher, "modelstore"),
        )
        say.check(
            "data key generated by the HSM, wrapped with AES-KWP under the KEK; the plaintext key was wiped after encryption"
        )
        say.check(
            f"one streaming pass: C2SP chunked AES-256-GCM body bound to the header; artifact sha256 {published.model.artifact_sha256[:16]}…"
        )
        say.info(
            "equivalent command: strongroom model publish model.onnx --name classifier --version 1 --key-id demo-classifier"
        )

        say.step("3", "Store: the model store keeps only ciphertext, and only valid artifacts")
        store = store_grpc.ModelStoreServiceStub(stack.channel(publisher, "modelstore"))
        listing = store.ListModels(store_pb.ListModelsRequest(), timeout=30)
        for m in listing.models:
            say.check(
                f"stored {m.name}/{m.version}: {m.artifact_size} bytes, wrapped under {m.key_id} v{m.key_version}"
            )
        artifact_copy = root / "publisher" / "classifier-1.artifact"
        with artifact_copy.open("wb") as out:
            for part in store.GetModel(
                store_pb.GetModelRequest(name=MODEL, version="1"), timeout=30
            ):
                out.write(part.data)
        plaintext = model.path.read_bytes()
        assert plaintext[64:96] not in artifact_copy.read_bytes()
        say.check("the stored bytes contain no run of the plaintext model")
        with artifact_copy.open("rb") as f:
            summary = read_summary(f)
        say.check(
            f"header readable without a key: model {summary.name}/{summary.version}, key {summary.key_id} v{summary.key_version}, {summary.plaintext_size} plaintext bytes"
        )
        why = _expect_failure(
            lambda: store.PutModel(iter([store_pb.PutModelRequest(data=plaintext)]), timeout=30)
        )
        say.refused(f"uploading the plaintext ONNX file itself: {why}")

        say.step("4", "Deploy: the inference service starts in a (simulated) confidential VM")
        inference = stack.start_process(
            "inference",
            {**stack.default_section("inference"), "models": [{"name": MODEL, "version": "1"}]},
        )
        say.check(
            f"inference service enrolled as {stack.spiffe_id('inference')}, serving OIP v2 over mTLS on {inference.address}"
        )

        say.step(
            "5",
            "Decrypt in the vault: challenge, attestation, release inside the HSM, decrypt in memory",
        )
        oip = oip_grpc.GRPCInferenceServiceStub(stack.channel(client, "inference"))
        deadline = time.monotonic() + 120
        while not oip.ModelReady(
            oip_pb.ModelReadyRequest(name=MODEL, version="1"), timeout=10
        ).ready:
            if time.monotonic() > deadline:
                raise StrongroomError(
                    "the model did not become ready; see " + str(stack.log_path("inference"))
                )
            time.sleep(0.2)
        record = _last_release(root)
        say.check(
            f"key broker verified the SEV-SNP report (signature, VCEK→ASK→ARK chain, TCB), nonce, REPORT_DATA binding, policy {record.get('policy_version')}"
        )
        say.check(
            f"measurement {record['claims']['measurement'][:16]}… allowed; the HSM re-wrapped the data key with {record['oaep_mechanism']} (C_WrapKey)"
        )
        say.check(f"decision {record['decision_id']} is in the hash-chained audit log")
        say.check(
            "artifact decrypted into memory on both cores and loaded into ONNX Runtime from bytes; key and buffers wiped"
        )

        say.step("6", "Serve: a client checks what it talks to, then runs inference over mTLS")
        nonce = np.random.default_rng().bytes(32)
        evidence_response = att_grpc.InferenceAttestationServiceStub(
            stack.channel(client, "inference")
        ).GetEvidence(att_pb.GetEvidenceRequest(nonce=nonce), timeout=30)
        authority = SimulatedAuthority.load(stack.root / "simulated-tee")
        trust = authority.trust_store()
        claims = verify_evidence(
            Evidence.from_proto(evidence_response.evidence),
            trust=trust,
            now=datetime.now(UTC),
            # The verifier's own collateral (the simulated chain's CRLs), from the same cache
            # the broker uses; never what the server sends.
            collateral=CollateralCache(stack.root / "collateral", trust, writable=False),
        )
        say.check(
            f"server evidence verifies (simulated chain, development trust only): measurement {claims.as_dict()['measurement'][:16]}…"
        )
        tls_key = _server_tls_key(stack, client)
        check_report_data(claims.report_data, client_report_data_for(nonce, tls_key))
        say.check(
            "its REPORT_DATA binds our nonce and the TLS key of the very connection we are using"
        )
        x = model.sample
        response = oip.ModelInfer(
            oip_pb.ModelInferRequest(
                model_name=MODEL,
                inputs=[
                    oip_pb.ModelInferRequest.InferInputTensor(
                        name="input", datatype="FP32", shape=list(x.shape)
                    )
                ],
                raw_input_contents=[x.astype("<f4").tobytes()],
            ),
            timeout=30,
        )
        out = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(
            tuple(response.outputs[0].shape)
        )
        np.testing.assert_allclose(out, model.predict(x), rtol=1e-5, atol=1e-6)
        say.check(
            f"ModelInfer over mTLS: classes {out.argmax(axis=1).tolist()} — identical to the plaintext model's output"
        )

        say.step("7", "Refusals")
        stack.start_process(
            "inference",
            {
                **stack.default_section("inference"),
                "simulated_measurement": "ab" * 48,
                "models": [{"name": MODEL, "version": "1"}],
            },
            instance="inference-rogue",
        )
        rogue = oip_grpc.GRPCInferenceServiceStub(
            stack.channel(client, "inference", instance="inference-rogue")
        )
        denied = _wait_denied(root)
        time.sleep(0.5)
        ready = rogue.ModelReady(
            oip_pb.ModelReadyRequest(name=MODEL, version="1"), timeout=10
        ).ready
        assert not ready
        say.refused(
            f"a VM measuring abab…ab asked for the key: {denied['reason']} (audited as {denied['decision_id']}); its model stays NOT ready"
        )

        store_admin = stack.services["modelstore"]
        del (
            store_admin
        )  # the store runs in its own process; tamper with its files as an attacker would
        blob = next(
            (root / "state" / "modelstore" / "data" / "blobs").rglob(
                published.model.artifact_sha256
            )
        )
        publish_model(
            model.path,
            name=MODEL,
            version="2",
            key_id=KEY_ID,
            broker=stack.channel(publisher, "keybroker"),
            store=stack.channel(publisher, "modelstore"),
        )
        stored2 = store.StatModel(
            store_pb.StatModelRequest(name=MODEL, version="2"), timeout=30
        ).model
        blob2 = next(
            (root / "state" / "modelstore" / "data" / "blobs").rglob(stored2.artifact_sha256)
        )
        blob2.chmod(0o600)
        data = bytearray(blob2.read_bytes())
        data[len(data) // 2] ^= 0x01
        blob2.write_bytes(bytes(data))
        say.info(f"flipped one bit in the stored ciphertext of {MODEL}/2 ({blob2.name[:16]}…)")
        why = _expect_failure(
            lambda: control_grpc.ModelControlServiceStub(
                stack.channel(admin, "inference")
            ).LoadModel(control_pb.LoadModelRequest(name=MODEL, version="2"), timeout=120)
        )
        say.refused(f"loading the tampered artifact: {why}")
        assert blob.exists()
        still = oip.ModelReady(oip_pb.ModelReadyRequest(name=MODEL, version="1"), timeout=10).ready
        say.check(f"{MODEL}/1 still serving: {still}")

        elapsed = time.perf_counter() - say.started
        print(
            f"\nDemo complete: {say.checks} checks passed in {elapsed:.1f}s. Working directory: {root}"
        )
        if args.keep:
            print("Services keep running; press Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    except (AssertionError, StrongroomError, grpc.RpcError) as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        for name in ("keybroker", "modelstore", "inference", "inference-rogue"):
            log = stack.log_path(name)
            if log.exists():
                print(
                    f"--- last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-15:]),
                    file=sys.stderr,
                )
        return 1
    finally:
        stack.close()


def _audit_records(root: Path) -> list[dict[str, Any]]:
    path = root / "state" / "keybroker" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_release(root: Path) -> dict[str, Any]:
    return next(
        r
        for r in reversed(_audit_records(root))
        if r.get("action") == "key_release" and r["decision"] == "allowed"
    )


def _wait_denied(root: Path, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        denied = [
            r
            for r in _audit_records(root)
            if r.get("action") == "key_release" and r["decision"] == "denied"
        ]
        if denied:
            return denied[-1]
        time.sleep(0.2)
    raise StrongroomError("no denied release was audited")


def _server_tls_key(stack: Any, client: Any) -> bytes:
    """The public key of the certificate the inference server presents on our mTLS connection."""
    import socket
    import ssl
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    context = ssl.create_default_context(cadata=stack.ca.root_pem.decode())
    credentials = client.credentials
    with tempfile.TemporaryDirectory() as tmp:
        # The client's own TLS key, briefly, in a private temporary file: ssl needs a path.
        path = Path(tmp) / "client.pem"
        path.touch(mode=0o600)
        path.write_bytes(credentials.chain_pem + credentials.key_pem)
        context.load_cert_chain(path)
    context.set_alpn_protocols(["h2"])
    host, port = stack.address("inference").rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="inference") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
