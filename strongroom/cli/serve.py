"""``strongroom serve SERVICE --config FILE`` and ``strongroom health``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strongroom.cli._text import printable
from strongroom.runtime import lifetime
from strongroom.runtime.config import SERVICES
from strongroom.runtime.log_writer import write_at_once
from strongroom.runtime.process import forbid_core_dumps


def register(sub: Any) -> None:
    """Adds the ``serve`` and ``health`` subcommands."""
    serve = sub.add_parser("serve", help="run a Strongroom service")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument(
        "--config",
        type=Path,
        help="YAML configuration (STRONGROOM__SECTION__KEY environment variables override it)",
    )
    serve.set_defaults(func=_serve)

    health = sub.add_parser(
        "health", help="check a service's plaintext health port (for container health checks)"
    )
    health.add_argument("--address", default="127.0.0.1:8081")
    health.add_argument("--service", default="", help="service name (default: overall)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=_health)


PRIVATE_UMASK = 0o077
"""What a service writes (logs, state, blobs, policies) is readable by its own user only."""


def _serve(args: argparse.Namespace) -> int:
    # Before anything secret is read: every service holds keys (the broker its HSM PIN, audit key
    # and data keys passing through the token; inference decrypted models; all a TLS key).
    forbid_core_dumps()
    os.umask(PRIVATE_UMASK)
    module = importlib.import_module(f"strongroom.{args.service}.server")
    # This process ends with the service: its signal handlers, exception hooks and logging stay
    # until the exit has written the last lines (strongroom.runtime.lifetime).
    with lifetime.ends_with_the_process():
        code: int = module.serve(args.config)
    return code


def _health(args: argparse.Namespace) -> int:
    try:
        with grpc.insecure_channel(args.address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        # Whatever answers the health port wrote the message: escaped, it cannot drive the
        # operator's terminal. Written as the command line's error line is (at once or not at
        # all): printed, it waited for good on a full pipe whose collector had stopped reading.
        _unhealthy(f"{exc.code().name}: {printable(exc.details())}")
        return 1
    try:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    except ValueError:
        # proto3 keeps a number its enum does not name: a ValueError traceback, not a verdict.
        _unhealthy(f"the serving status {response.status} is none this command knows")
        return 1
    # NOT_SERVING is an unhealthy verdict too: at once or not at all, as the unhealthy line.
    write_at_once(sys.stdout, status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def _unhealthy(why: str) -> None:
    write_at_once(sys.stderr, f"unhealthy: {why}", cut_to_fit=True)
