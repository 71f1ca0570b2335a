"""Who a caller is, for every per-identity limit (streams, attestation rate).

A per-identity limit must count one identity once, however its certificates differ: the key is
the SPIFFE ID the authoriser verified (:func:`~strongroom.pki.authz.verified_caller`, the same
parse), never the certificate's SANs as a string. Two certificates of one workload that carry
different DNS names share a bucket; a DNS name added to a certificate buys no second one.
"""

from __future__ import annotations

import grpc

from strongroom.pki.authz import verified_caller
from strongroom.pki.errors import PeerUnauthenticated
from strongroom.reasons import Reason

UNVERIFIED = "unverified-certificate"
"""The one bucket shared by every caller whose certificate yields no usable SPIFFE ID (only public
methods admit them, such as health): a certified client cannot multiply its buckets by holding
certificates the authoriser would refuse. It cannot collide with a SPIFFE ID (no ``spiffe://``)."""


def caller_key(context: grpc.ServicerContext) -> str:
    """The caller of this RPC for per-identity accounting: its verified SPIFFE ID.

    A caller without a usable identity counts in :data:`UNVERIFIED`; a peer without any client
    certificate (a plaintext host, which only tests run) counts by its address.
    """
    try:
        return str(verified_caller(context).spiffe_id)
    except PeerUnauthenticated as exc:
        if exc.reason == Reason.NO_PEER_CERT:
            return f"peer:{context.peer()}"
        return UNVERIFIED
