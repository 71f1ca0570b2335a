"""The one mapping between the key broker's RPC ``WrapMechanism`` and the artifact header's.

The at-rest format owns its enum (``strongroom.api.artifact.v1.WrapMechanism``, mirrored by
:class:`strongroom.artifact.WrapMechanism`) so that a stored artifact does not depend on an RPC
API. The numbers happen to agree, but the clients translate explicitly here rather than passing
one enum's integer off as the other's.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.artifact import HEADER_WRAP_MECHANISMS, WrapMechanism
from strongroom.errors import FailedPrecondition
from strongroom.reasons import Reason

__all__ = ["TO_HEADER", "header_mechanism"]

TO_HEADER: Mapping[kb_pb.WrapMechanism.ValueType, WrapMechanism] = MappingProxyType(
    {
        kb_pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD: WrapMechanism.AES_KEY_WRAP_PAD,
        kb_pb.WRAP_MECHANISM_RSA_OAEP_SHA1: WrapMechanism.RSA_OAEP_SHA1,
        kb_pb.WRAP_MECHANISM_RSA_OAEP_SHA256: WrapMechanism.RSA_OAEP_SHA256,
    }
)
"""Each named broker mechanism and the header value with the same meaning."""


def header_mechanism(mechanism: kb_pb.WrapMechanism.ValueType | int) -> WrapMechanism:
    """The header value for the mechanism the broker wrapped a data key with.

    Raises FailedPrecondition(UNSUPPORTED_WRAP_MECHANISM) for a mechanism the broker did not name
    (unset, or newer than this client) or one an artifact header may not carry: publishing with it
    would write an artifact no reader accepts.
    """
    header = TO_HEADER.get(kb_pb.WrapMechanism.ValueType(mechanism))
    if header is None or header not in HEADER_WRAP_MECHANISMS:
        name = (
            kb_pb.WrapMechanism.Name(kb_pb.WrapMechanism.ValueType(mechanism))
            if mechanism in kb_pb.WrapMechanism.values()
            else str(int(mechanism))
        )
        allowed = ", ".join(f"WRAP_MECHANISM_{m.name}" for m in sorted(HEADER_WRAP_MECHANISMS))
        raise FailedPrecondition(
            f"the key broker wrapped the data key with {name}; an artifact header needs {allowed}",
            reason=Reason.UNSUPPORTED_WRAP_MECHANISM,
        )
    return header
