"""How operator commands reach the services: a client configuration and a workload identity.

A client configuration (``--client-config FILE`` or ``$STRONGROOM_CLIENT_CONFIG``) names the
caller's identity (enrolled once with a one-time token, then persisted in ``state_dir``) and the
services' addresses::

    identity: {trust_domain: …, spiffe_id: spiffe://…/admin, ca_url: https://…, ca_root_file: …,
               token_file: …, state_dir: …}
    keybroker: keybroker.example:7443
    modelstore: modelstore.example:7443
    inference: inference.example:7443
    keybroker_release_signing_public_keys: [release-signing-key.pub.pem]   # for `model fetch`

Every channel checks that the server it reaches presents the SPIFFE ID expected there:
``spiffe://<trust domain>/<service>`` unless ``<service>_spiffe_id`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from strongroom.client.server_evidence import ServerConnection
from strongroom.client.store_channel import store_channel
from strongroom.closing import Closing
from strongroom.pki.identity import WorkloadIdentity
from strongroom.runtime.bootstrap import open_identity
from strongroom.runtime.config import (
    ConfigError,
    IdentityConfig,
    build,
    expected_server_id,
    load_mapping,
)

CLIENT_CONFIG_ENV = "STRONGROOM_CLIENT_CONFIG"


@dataclass(frozen=True)
class ClientConfig:
    """Identity and service addresses for operator commands."""

    identity: IdentityConfig
    keybroker: str | None = None
    modelstore: str | None = None
    inference: str | None = None
    # Names the services' certificates carry, when the addresses differ (e.g. 127.0.0.1:port).
    keybroker_server_name: str = "keybroker"
    modelstore_server_name: str = "modelstore"
    inference_server_name: str = "inference"
    # The SPIFFE ID each service must present (default spiffe://<trust domain>/<service>).
    keybroker_spiffe_id: str | None = None
    modelstore_spiffe_id: str | None = None
    inference_spiffe_id: str | None = None
    # The key broker's release-signing public keys (PEM files): what `model fetch` verifies the
    # broker's release answers with (it refuses to run without them).
    keybroker_release_signing_public_keys: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        for service in ("keybroker", "modelstore", "inference"):
            self.server_id(service)  # validates

    def server_id(self, service: str) -> str:
        """The SPIFFE ID ``service`` must present."""
        configured: str | None = getattr(self, f"{service}_spiffe_id")
        return expected_server_id(self.identity.trust_domain, service, configured, where="client")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--client-config``."""
    parser.add_argument(
        "--client-config",
        type=Path,
        default=None,
        help=f"client configuration (default: ${CLIENT_CONFIG_ENV})",
    )


class Client(Closing):
    """An operator's identity and channels to the services; close it when done."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        # A client only: servers never check its name (no warning about a derived name).
        self.identity: WorkloadIdentity = open_identity(config.identity, serves=False)
        self._channels: list[grpc.Channel] = []

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Client:
        """Loads the client configuration named on the command line or in the environment."""
        path = args.client_config or (
            Path(os.environ[CLIENT_CONFIG_ENV]) if os.environ.get(CLIENT_CONFIG_ENV) else None
        )
        if path is None:
            raise ConfigError(
                f"no client configuration: pass --client-config or set ${CLIENT_CONFIG_ENV}"
            )
        data: dict[str, Any] = load_mapping(path, environ={})
        return cls(build(ClientConfig, data, "client"))

    def channel(self, service: str) -> grpc.Channel:
        """An mTLS channel to ``service`` (keybroker, modelstore or inference)."""
        address = getattr(self.config, service)
        if not address:
            raise ConfigError(f"the client configuration has no address for {service}")
        server_name = getattr(self.config, f"{service}_server_name")
        server_id = self.config.server_id(service)
        channel: grpc.Channel
        if service == "modelstore":  # its downloads read by their own thread (store_channel)
            channel = store_channel(
                self.identity, address, server_name=server_name, server_id=server_id
            )
        else:
            channel = self.identity.channel(address, server_name=server_name, server_id=server_id)
        self._channels.append(channel)
        return channel

    def server_connection(self, service: str) -> ServerConnection:
        """One mTLS connection to ``service`` carrying a gRPC channel, with the key of the
        certificate the server presented on it (gRPC's own channels do not show it); the
        certificate must carry the SPIFFE ID expected there (:meth:`ClientConfig.server_id`).
        Close it when done."""
        address = getattr(self.config, service)
        if not address:
            raise ConfigError(f"the client configuration has no address for {service}")
        return ServerConnection.of_identity(
            self.identity,
            address,
            server_name=getattr(self.config, f"{service}_server_name"),
            server_id=self.config.server_id(service),
        )

    def close(self) -> None:
        """Closes the channels and stops the identity's renewal."""
        for channel in self._channels:
            channel.close()
        self.identity.close()
