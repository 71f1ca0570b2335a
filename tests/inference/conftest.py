"""Fixtures: a real in-process gRPC server (insecure; the service host adds mTLS) around the servicers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from strongroom.api.inference.v1 import attestation_pb2_grpc
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from strongroom.inference.evidence_service import InferenceAttestationServicer
from strongroom.inference.models import ModelRepository
from strongroom.inference.oip import InferLimits, OipServicer, ResponseBudget, add_to_server
from strongroom.runtime.interceptors import ErrorMappingInterceptor, RequestDecodingInterceptor
from strongroom.runtime.unsent import UnsentResponses


@dataclasses.dataclass
class Running:
    """A started server and a client for it."""

    address: str
    channel: grpc.Channel
    oip: oip_grpc.GRPCInferenceServiceStub
    evidence: attestation_pb2_grpc.InferenceAttestationServiceStub
    server: grpc.Server


Starter = Callable[..., Running]


def start(
    repository: ModelRepository,
    *,
    limits: InferLimits | None = None,
    evidence: InferenceAttestationServicer | None = None,
    workers: int = 8,
    response_budget: ResponseBudget | None = None,
    unsent: UnsentResponses | None = None,
) -> Running:
    """Starts a server for ``repository`` (and optionally the evidence service) on localhost."""
    limits = limits or InferLimits()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=[ErrorMappingInterceptor(), RequestDecodingInterceptor()],
        options=limits.grpc_server_options(),
    )
    servicer = OipServicer(
        repository,
        limits=limits,
        server_version="9.9.9-test",
        response_budget=response_budget,
        unsent=unsent,
    )
    add_to_server(servicer, server)
    if evidence is not None:
        attestation_pb2_grpc.add_InferenceAttestationServiceServicer_to_server(evidence, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 512 << 20)]
    )
    return Running(
        address,
        channel,
        oip_grpc.GRPCInferenceServiceStub(channel),
        attestation_pb2_grpc.InferenceAttestationServiceStub(channel),
        server,
    )


def stop(running: Running) -> None:
    """Closes the client and stops the server."""
    running.channel.close()
    running.server.stop(grace=None)


@pytest.fixture
def start_server() -> Iterator[Starter]:
    """Starts servers on demand; all are stopped at the end of the test."""
    started: list[Running] = []

    def starter(repository: ModelRepository, **kwargs: Any) -> Running:
        running = start(repository, **kwargs)
        started.append(running)
        return running

    yield starter
    for running in started:
        stop(running)
