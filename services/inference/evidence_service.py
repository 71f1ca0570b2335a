"""``InferenceAttestationService.GetEvidence``: lets a client check what it talks to.

The client sends a fresh nonce; the server asks the hardware for a report whose REPORT_DATA is
``binding.client_report_data_for(nonce, tls_spki_der)`` (SHA-512 over a domain-separation label
and both length-prefixed fields, exactly 64 bytes) and returns it with the SHA-256 of its current
TLS key. The client recomputes REPORT_DATA with its nonce and the key of the TLS connection it is
on, so evidence cannot be replayed to another client or relayed from another server.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc

from strongroom.api.inference.v1 import attestation_pb2 as pb
from strongroom.api.inference.v1 import attestation_pb2_grpc as pb_grpc
from strongroom.attestation import binding
from strongroom.attesters import Attester
from strongroom.errors import InvalidArgument, ResourceExhausted
from strongroom.reasons import Reason
from strongroom.runtime.callers import caller_key
from strongroom.runtime.ratelimit import CallerBuckets

log = logging.getLogger(__name__)

MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64


class InferenceAttestationServicer(pb_grpc.InferenceAttestationServiceServicer):
    """GetEvidence over an :class:`Attester`; ``tls_public_key_provider`` returns the DER
    SubjectPublicKeyInfo of the certificate the server currently presents (it changes on renewal).
    At most ``max_concurrent`` hardware requests run at once; more fail with ATTESTATION_BUSY.
    One caller holds at most ``max_per_caller`` of them (default: just under half, at least 1, so
    that two callers at their share leave a request for a third); more of its own fail with
    TOO_MANY_ATTESTATIONS_PER_IDENTITY. Without that share, one client whose requests the
    firmware answered slowly (the host throttles them) held every slot at its own rate, and
    every other tenant's check of the server was ATTESTATION_BUSY for as long as it kept them.

    Each caller (its verified SPIFFE ID: extra SANs in a certificate buy no second rate) may ask
    for ``per_caller_burst`` reports at once and ``per_caller_rate`` a second after that; beyond it, ATTESTATION_RATE_LIMITED. A report is a
    guest request to the platform's firmware, which the host throttles; with /dev/sev-guest a
    request the host stalls long enough makes the guest driver disable the VM's channel to the
    firmware until the VM restarts, so no one caller may keep the hardware busy (a client needs
    one report per connection it checks).
    """

    def __init__(
        self,
        attester: Attester,
        tls_public_key_provider: Callable[[], bytes],
        *,
        max_concurrent: int = 4,
        max_per_caller: int | None = None,
        per_caller_rate: float = 4.0,
        per_caller_burst: int = 32,
        clock: Callable[[], float] = time.monotonic,
        report_data_fn: Callable[[bytes, bytes], bytes] = binding.client_report_data_for,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if max_per_caller is None:
            max_per_caller = max(1, (max_concurrent - 1) // 2)
        if not 1 <= max_per_caller <= max_concurrent:
            raise ValueError("max_per_caller must be between 1 and max_concurrent")
        if per_caller_rate <= 0 or per_caller_burst < 1:
            raise ValueError("per_caller_rate must be positive and per_caller_burst at least 1")
        self._attester = attester
        self._tls_key = tls_public_key_provider
        self._report_data = report_data_fn
        self._max = max_concurrent
        self._per_caller = max_per_caller
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()  # hardware requests running, per caller
        self._rate = per_caller_rate
        self._burst = per_caller_burst
        self._buckets = CallerBuckets(per_caller_rate, per_caller_burst, clock=clock)

    def GetEvidence(
        self, request: pb.GetEvidenceRequest, context: grpc.ServicerContext
    ) -> pb.GetEvidenceResponse:
        """Fresh evidence bound to the client's nonce and this server's TLS key."""
        nonce = request.nonce
        if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
            raise InvalidArgument(
                f"nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes, got {len(nonce)}",
                reason=Reason.NONCE_LENGTH,
            )
        caller = caller_key(context)
        if not self._buckets.take(caller):
            raise ResourceExhausted(
                f"more than {self._burst} attestation requests at once, or more than "
                f"{self._rate:g} a second after that, from this caller; retry later",
                reason=Reason.ATTESTATION_RATE_LIMITED,
            )
        spki = self._tls_key()
        report_data = self._report_data(nonce, spki)
        refused = self._enter(caller)
        if refused is not None:
            # The hardware was not asked: the caller keeps its token, or other callers filling the
            # slots would spend its rate for it (and it would then be ATTESTATION_RATE_LIMITED).
            self._buckets.refund(caller)
            raise refused
        try:
            bundle = self._attester.attest(report_data)
        finally:
            self._leave(caller)
        log.info(
            "evidence issued",
            extra={"tee_type": bundle.tee_type.name, "source": bundle.source},
        )
        return pb.GetEvidenceResponse(
            evidence=bundle.to_proto(),
            report_data=report_data,
            tls_public_key_sha256=hashlib.sha256(spki).digest(),
        )

    def _enter(self, caller: str) -> ResourceExhausted | None:
        """Takes a hardware request slot for ``caller``; the refusal (nothing taken) if it holds
        its share already or every slot is taken. The caller's own share is judged first: a
        caller over it is told so, whatever the others hold."""
        with self._lock:
            own = self._in_flight[caller] >= self._per_caller
            if not own and self._in_flight.total() < self._max:
                self._in_flight[caller] += 1
                return None
        if own:
            return ResourceExhausted(
                f"this caller already has {self._per_caller} attestation requests in progress "
                f"(of {self._max} the server runs at once); retry when one is answered",
                reason=Reason.TOO_MANY_ATTESTATIONS_PER_IDENTITY,
            )
        return ResourceExhausted(
            "too many attestation requests in progress; retry shortly",
            reason=Reason.ATTESTATION_BUSY,
        )

    def _leave(self, caller: str) -> None:
        with self._lock:
            self._in_flight[caller] -= 1
            if self._in_flight[caller] <= 0:
                del self._in_flight[caller]  # only callers with requests running are kept
