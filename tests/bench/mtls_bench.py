"""The model store and inference benchmarks again, over mutual TLS with step-ca certificates.

Runs ``modelstore_bench`` and ``inference_bench`` with real workload identities (a DevStack CA)
so that their store/bare-stream and mTLS/no-TLS ratios are measured in this run; the plaintext
figures come from the same modules' runs without credentials (``make bench`` runs both).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import grpc

from strongroom.dev.devstack import DevStack
from strongroom.pki import StepCa, WorkloadIdentity
from strongroom.runtime.config import AuthzConfig, CommonConfig, IdentityConfig
from tests.bench import inference_bench, modelstore_bench
from tests.bench._scale import scaled


def run(
    results: dict[str, Any], *, size: int = modelstore_bench.DEFAULT_SIZE, scale: float = 1.0
) -> None:
    """Store upload/download and OIP inference, each with and without mTLS, in one run
    (``scale``: :mod:`tests.bench._scale`)."""
    repeats = scaled(2, scale)
    with tempfile.TemporaryDirectory() as tmp, DevStack(Path(tmp)) as stack:
        ca = stack.start_ca()
        server = WorkloadIdentity.enrol(ca.client(), stack.token("server", ["localhost"]))
        client = WorkloadIdentity.enrol(ca.client(), stack.token("client"))
        try:

            def channel(target: str) -> grpc.Channel:
                return client.channel(target, options=modelstore_bench._CHANNEL_OPTIONS)

            store: dict[str, Any] = {}
            modelstore_bench.run(store, size=size, repeats=repeats)
            tls = modelstore_bench.StoreTls(server, _store_config(stack, ca), channel)
            modelstore_bench.run(store, size=size, repeats=repeats, tls=tls)
            results["modelstore"] = store
            infer: dict[str, Any] = {}
            inference_bench.run(infer, load_sizes_mb=(), scale=scale)
            plain = infer.pop("oip_infer")
            inference_bench.run(
                infer,
                server_credentials=server.server_credentials(),
                channel_factory=channel,
                load_sizes_mb=(),
                scale=scale,
            )
            results["inference"] = {"no_tls": plain, "mtls": infer["oip_infer"]}
            results["inference"]["ratio_mtls_to_no_tls_throughput"] = _ratio(
                infer["oip_infer"], plain
            )
        finally:
            server.close()
            client.close()


def _store_config(stack: DevStack, ca: StepCa) -> CommonConfig:
    """The store's common configuration for ``server``'s identity, as a deployment's would be,
    the benchmark's ``client`` holding the publisher role (which also reads)."""
    return CommonConfig(
        service="modelstore",
        listen="localhost:0",
        identity=IdentityConfig(
            trust_domain=stack.trust_domain,
            spiffe_id=stack.spiffe_id("server"),
            ca_url=ca.url,
            ca_root_file=ca.layout.root_cert_path,
        ),
        # An admin too, as a deployment has: with none, the host warns that its admin-only
        # methods are denied to everyone.
        authz=AuthzConfig(
            publisher=(stack.spiffe_id("client"),), admin=(stack.spiffe_id("admin"),)
        ),
    )


def _ratio(mtls: dict[str, Any], plain: dict[str, Any]) -> dict[str, float]:
    """mTLS / no-TLS requests per second, sequential and concurrent (target ≥ 0.9)."""
    return {
        key: round(mtls[key]["requests_per_s"] / plain[key]["requests_per_s"], 3)
        for key in mtls
        if key.startswith("model_infer_") and isinstance(mtls[key], dict)
    }
