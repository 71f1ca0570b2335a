"""Strongroom's internal PKI: a step-ca CA, SPIFFE workload identities and mTLS for gRPC.

Services use :class:`WorkloadIdentity` (enrolment, background renewal, rotating server credentials
and client channels), :class:`SpiffeAuthorizer` (per-RPC authorisation) and :func:`caller_identity`.
Operators and tests use :func:`init_ca`, :class:`StepCa` and :func:`mint_token`.
"""

from strongroom.pki.authz import CallerIdentity, SpiffeAuthorizer, caller_identity
from strongroom.pki.bootstrap import Workload, init_ca, workload_template
from strongroom.pki.channel import RotatingChannel
from strongroom.pki.client import CaClient
from strongroom.pki.credentials import Credentials
from strongroom.pki.handshake import ClientCertificateRejected
from strongroom.pki.identity import IdentityStatus, RenewalPolicy, WorkloadIdentity
from strongroom.pki.layout import CaLayout, Provisioner
from strongroom.pki.stepca import StepCa
from strongroom.pki.token import mint_token
from strongroom.spiffe import SpiffeId

__all__ = [
    "CaClient",
    "CaLayout",
    "CallerIdentity",
    "ClientCertificateRejected",
    "Credentials",
    "IdentityStatus",
    "Provisioner",
    "RenewalPolicy",
    "RotatingChannel",
    "SpiffeAuthorizer",
    "SpiffeId",
    "StepCa",
    "Workload",
    "WorkloadIdentity",
    "caller_identity",
    "init_ca",
    "mint_token",
    "workload_template",
]
