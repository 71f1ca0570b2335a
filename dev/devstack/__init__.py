"""A complete local Strongroom deployment for the demo and the end-to-end tests.

:class:`DevStack` lays out, under one directory, a real step-ca PKI, a SoftHSM2 token, the
simulated TEE chain, the secrets (mode 0600 files) and one configuration file per service, then
starts the services either in this process (tests) or as separate processes (the demo). Everything
it makes is for development only: the configurations say ``mode: development``.
"""

from strongroom.dev.devstack.audit import read_audit_records
from strongroom.dev.devstack.stack import DevStack, RunningService

__all__ = ["DevStack", "RunningService", "read_audit_records"]
