"""Reason codes: every refusal and failure Strongroom reports names one.

A reason travels as the ``REASON:`` prefix of a gRPC status message and as the trailing-metadata
entry :data:`METADATA_KEY`; clients read the trailer, never the message text.
"""

from __future__ import annotations

#: The trailing-metadata key that carries a failed RPC's reason.
METADATA_KEY = "strongroom-reason"
