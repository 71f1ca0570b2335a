"""A bare test service ("svc") on the stack's CA, for tests of the runtime's host as built for
production (``build_host``): its enrolled identity and common configuration."""

from __future__ import annotations

from strongroom.dev.devstack import DevStack
from strongroom.pki import WorkloadIdentity
from strongroom.pki.identity import RenewalPolicy
from strongroom.runtime.config import AuthzConfig, CommonConfig, IdentityConfig


def enrolled_svc(stack: DevStack) -> tuple[WorkloadIdentity, CommonConfig]:
    """``svc`` enrolled at the stack's CA (the caller closes the identity), and a configuration
    naming the stack's admin and client as those roles."""
    ca = stack.start_ca()
    identity = WorkloadIdentity.enrol(
        ca.client(), stack.token("svc", ["localhost"]), policy=RenewalPolicy()
    )
    common = CommonConfig(
        service="modelstore",
        listen="127.0.0.1:0",
        identity=IdentityConfig(
            trust_domain=stack.trust_domain,
            spiffe_id=stack.spiffe_id("svc"),
            ca_url=ca.url,
            ca_root_file=ca.layout.root_cert_path,
        ),
        authz=AuthzConfig(admin=(stack.spiffe_id("admin"),), client=(stack.spiffe_id("client"),)),
    )
    return identity, common
