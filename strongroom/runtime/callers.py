"""Who a caller is, for every per-identity limit, and the cap on the unary RPCs it may run at once.

A per-identity limit must count one identity once, however its certificates differ: the key is
the SPIFFE ID the authoriser verified (:func:`~strongroom.pki.authz.verified_caller`, the same
parse), never the certificate's SANs as a string. Two certificates of one workload that carry
different DNS names share a bucket; a DNS name added to a certificate buys no second one.

Streams are limited by :class:`~strongroom.runtime.streams.StreamGuard`. A unary RPC holds one of
the server's ``max_workers`` threads for as long as its handler runs (a key release waiting on
collateral or the HSM, a store call against a slow backend), so :class:`UnaryGuard` admits one
only while its caller has fewer than ``max_per_identity`` running; the excess fails at once with
``RESOURCE_EXHAUSTED`` (``TOO_MANY_UNARY_CALLS_PER_IDENTITY``) instead of queueing every other
caller behind it. A call counts from the moment its handler starts until the handler returns,
however it ends (an answer, an error, an abort); a call its client cancelled counts until its
handler returns too, since gRPC cannot stop the thread that runs it.

Two identities at that cap could still hold every worker together, and queue everyone else, the
operator included. So the workers are split (:class:`WorkerShares`): a reserve that only the
service's *control-plane* methods may use (model control, key administration, deletes, health:
each service names its own), and the rest, which *data-plane* calls (unary calls and blocking
streams of every other method) hold all callers together; a data-plane call beyond it fails at once
with ``RESOURCE_EXHAUSTED`` (``DATA_PLANE_WORKERS_BUSY``).

The per-kind caps (unary calls here, streams in the stream guard) each bound one kind: one caller
at both held 13 unary calls + 8 blocking streams of the 28 data-plane workers, health calls that
never sent their message beside them, and two callers held them all. So the shares also bound the
data-plane workers each caller holds, every kind together (``per_identity``,
``server.max_data_plane_workers_per_identity``; ``TOO_MANY_WORKERS_PER_IDENTITY``), which defaults
to just under half the data-plane workers, so that two callers at their bound leave a worker for a
third. Control-plane calls count against their caller's unary cap only: an operator's calls are
few, and health checks are answered at once. Only the wait for a call's request message tells
public control-plane methods (health) from the operator's: a public one waits within the data
plane (:meth:`UnaryGuard.wait_for_request`), since any certificate may call it.

Any certificate: the CA signs for SPIFFE IDs the services give no role, and a public method admits
every one of them. Counted one by one, N such identities had N caps of health calls that never
sent their message, each holding a data-plane worker, and three of them held the whole data plane.
So every caller the authoriser grants no method that is not public (:data:`ROLELESS`, which an
unusable certificate joins) counts as one caller, and their waits for a request message, all
together, are capped lower still (``server.max_roleless_request_waits``; ``ROLELESS_CALLERS_BUSY``).
A cap on every public wait would not do: an authorised caller's burst of health ``Watch`` calls
waits, each for milliseconds under load with its message already buffered, and was refused. What
a public method's wait may last is bounded instead (``server.health_request_wait_seconds``): a
watchdog cancels the call past it (gRPC Python has no timed read, and a status cannot be set from
another thread, so its caller sees ``CANCELLED``), where it held its worker until its deadline or
its connection's age.

A wait for a request message counts in its caller's bound like any data-plane worker, from its
start: counting it only once it had lasted would let stalled waits hold workers until then. At its
bound, a caller's further wait is still admitted, on trust, while the data plane has room (and
its waits on trust number fewer than its bound, so that it leaves the others a worker): a
message sent with the call (what every gRPC client does) is read within milliseconds, and a burst
of an authorised caller's health ``Watch`` calls is not refused for waits that end at once. A wait
admitted so that still waits after :data:`TRUSTED_WAIT_SECONDS` is counted in the bound if it now
fits there, or cancelled; one that ends without its message before then (cancelled by its client
or the wait bound) counts as stalled too; either way its caller's certificate is then trusted no
more for :data:`DISTRUST_SECONDS`, so that its waits beyond the bound are refused at once and
stalled ones cannot be renewed past it (counted ones included: a caller that let its older waits go
just before its trusted ones were due had them counted, then trusted new ones, and held twice its
bound). Its certificate, not its SPIFFE ID, which a fleet's replicas share: one replica's stall put
the whole fleet's health bursts on refuse-at-once. A replica can renew onto new serials at will, so
the second certificate of an identity to stall distrusts the identity whole (:class:`Distrust`).

A fleet's replicas share one SPIFFE ID, and so one cap: one replica (compromised, or stuck) that
opened ``ReleaseKey`` calls and never sent their message held all 13 of the broker's unary calls
for its identity, for as long as its connection lived, and every other replica's release was
refused ``TOO_MANY_UNARY_CALLS_PER_IDENTITY`` (65 of 65 in 20 s, measured on a real broker). So
each certificate (:func:`certificate_bucket`, beneath its caller's :func:`bucket`) holds at most
its share of its identity's data-plane bound (``server.max_calls_per_certificate``, for a fleet
:func:`certificate_share`: half, at least :data:`CERTIFICATE_FLOOR`; not set, no share: a client
of one certificate keeps its whole bound): its data-plane unary calls and
its waits for a request message; beyond it they are refused at once with
``TOO_MANY_CALLS_PER_CERTIFICATE`` (a wait on trust first, as at the bound, and no more of
them on trust at once than its share), and the rest stays for the other replicas. Control-plane calls (health's own, once its message came) are not shared:
a burst of one replica's health checks is answered as before. A certificate's blocking streams
count in its share like its unary calls: counted in the identity's bound alone, one stuck replica
held its 8 stalled downloads and 8 unary waits beside them at the store, the fleet's whole bound
of 16, and every other replica's model load was refused ``TOO_MANY_WORKERS_PER_IDENTITY``. A
share must therefore hold one healthy replica's load (at the store 4 part fetches x 2 models = 8
downloads and a few unary calls; the chart sets 12 of 24 there for a fleet). Streams have a share
of their own besides, of the identity's stream cap
(:class:`~strongroom.runtime.streams.StreamGuard`, ``server.max_streams_per_certificate``, which
counts non-blocking ones such as health ``Watch`` too), keyed by the same :func:`certificate_key`.
The identity's bound still counts the total, however many certificates it holds: a replica can
renew onto new serials at will, and each buys a share, never more than the identity's bound (two
certificates at their share hold it all again). The shares count what is held now, each
certificate forgotten when it holds nothing, so they hold as many entries as calls run.

The share bounds how many such stalls a certificate holds, not how long: a data-plane call's own
wait for its request message had no watchdog, and held its worker until its deadline or its
connection's age (some 40 minutes). It is bounded too (:meth:`UnaryGuard.read_request`,
``server.request_wait_seconds``: by default what the stream floor allows the call's method's
largest request, at least 10 s), by the same watchdog as a public method's wait. Per method: one
bound for the service, what its largest request needed, held a store ``StatModel`` that never
sent its few bytes for the 65 s of an upload chunk, an inference ``ModelMetadata`` for the 17
minutes of a 64 MiB tensor. A ``server.request_wait_seconds`` set is every method's bound.

A watchdog's cancel and a handler's going on with the message it read exclude each other: a
``ReleaseKey`` whose message was read just as the watchdog cancelled its call was granted, its key
re-wrapped and audited allowed, and its answer never delivered. Each claims the call under the lock
(the watchdog by cancelling it while it still waits, the handler by taking its message), and a
handler that lost refuses its call for the watchdog's reason, its message unprocessed.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import grpc

from strongroom.errors import (
    REFUSAL_CALL,
    REFUSAL_LINE,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
)
from strongroom.pki.authz import verified_caller
from strongroom.pki.errors import PeerUnauthenticated
from strongroom.reasons import Reason
from strongroom.runtime.call_peer import call_peer
from strongroom.runtime.grpc_types import HandlerInterceptor, RpcMethodHandler
from strongroom.spiffe import SpiffeId

log = logging.getLogger(__name__)

ROLELESS = "roleless-callers"
"""The one bucket shared by every caller the authoriser grants no method that is not public: a
certificate that yields no usable SPIFFE ID, and any SPIFFE ID no rule names (the CA signs for
names the services give no role). Only public methods (health) admit them, so a holder of many
such certificates cannot multiply its buckets, in the limits or in the budgets of what their
refusals write (the key broker's audit records, the refusal log lines). It cannot collide with a
SPIFFE ID (no ``spiffe://``)."""

TRUSTED_WAIT_SECONDS = 1.0
"""How long a wait for a request message admitted beyond its caller's data-plane bound may last
(:meth:`UnaryGuard.wait_for_request`): a message sent with the call is read within milliseconds."""

DISTRUST_SECONDS = 60.0
"""How long a certificate one of whose waits admitted so proved stalled is trusted no more (its
identity, once :data:`DISTRUSTED_CERTIFICATES` of its certificates are): each wait beyond its
bound is then refused at once, so that stalled waits renewed cannot hold the workers."""

DISTRUSTED_CERTIFICATES = 2
"""How many certificates of one identity proving stalled, each within :data:`DISTRUST_SECONDS`
of the last, distrust the identity whole (:class:`Distrust`): one stuck replica costs its own
certificate only, while a replica renewing onto new serials buys one more moment of trust."""

_OWN, _COUNTED, _TRUSTED = "own", "counted", "trusted"  # how a wait for a request holds a worker
_LATE, _STALLED = (
    "late",
    "stalled",
)  # which watchdog cancelled a call: the wait bound's, the trust's

Identify = Callable[[grpc.ServicerContext], str]
"""Names the caller of an RPC for per-identity accounting (default: :func:`caller_key`)."""

Certify = Callable[[grpc.ServicerContext, str], str | None]
"""Names the certificate of an RPC's caller, counted as the identity given, for the shares beneath
its caps (default: :func:`certificate_key`); None: it has no share beneath them."""

Grants = Callable[[SpiffeId], bool]
"""Whether the authoriser grants a SPIFFE ID any method that is not public
(:meth:`~strongroom.pki.authz.SpiffeAuthorizer.grants_any`)."""


def bucket(spiffe_id: SpiffeId | None, grants: Grants | None = None) -> str:
    """The bucket a caller counts in, the one rule of every per-caller budget and limit: its
    verified SPIFFE ID, or :data:`ROLELESS` when its certificate yields none usable (no URI SAN
    or several, one that does not parse, expired or not yet valid, a CA's) or when ``grants`` says
    the authoriser grants it no method that is not public. Without ``grants`` every SPIFFE ID
    counts on its own: only for a budget that no role-less caller reaches (the authoriser refused
    it first). Many role-less identities (the CA signs for names no rule gives a role) thus buy
    one bucket, not one each."""
    if spiffe_id is None or (grants is not None and not grants(spiffe_id)):
        return ROLELESS
    return str(spiffe_id)


def certificate_bucket(spiffe_id: str, serial: int) -> str:
    """The bucket of one certificate of a caller with a role, for a budget per certificate beneath
    its SPIFFE ID's (:func:`bucket`): a fleet's replicas share one SPIFFE ID, each has its own
    certificate, so one bad replica spends its own budget, not the fleet's. A holder of its
    service's provisioner (or a replica renewing onto a new key) gets a new certificate, and a new
    budget, at will: such a budget is always bounded by its SPIFFE ID's as well."""
    # A space is in neither a SPIFFE ID nor a hex serial: no two certificates share a bucket.
    return f"{spiffe_id} {serial:x}"


CERTIFICATE_FLOOR = 2
"""The share of a cap one certificate holds however small the cap (but never more than the cap):
a replica makes a release while its previous one still waits on the HSM."""


def certificate_share(cap: int) -> int:
    """How much of an identity's ``cap`` (its data-plane bound) one of its certificates may hold
    by default: half of it, at least :data:`CERTIFICATE_FLOOR`, at most ``cap``. Half, so that one
    replica whatever it does leaves the rest of its fleet at least as much as it holds."""
    return min(cap, max(CERTIFICATE_FLOOR, cap // 2))


MAX_CERTIFICATES_TRACKED = 4096
"""How many certificates a budget per certificate (:func:`certificate_bucket`) remembers at most,
the one counted longest ago forgotten first: a holder of its service's provisioner mints them as
fast as the CA signs, and each was remembered until its bucket refilled (a VCEK fetch budget's
240 s: 65,000 at 274 a second). Forgetting one only gives it a new budget of its own, which its
SPIFFE ID's bounds; a fleet of up to this many replicas is counted exactly (about 220 bytes each)."""


def caller_key(context: grpc.ServicerContext, grants: Grants | None = None) -> str:
    """The caller of this RPC for per-identity accounting: its :func:`bucket`, from the SPIFFE ID
    the authoriser verified; a peer without any client certificate (a plaintext host, which only
    tests run) counts by its address, as read while its call lasted (:func:`call_peer`)."""
    try:
        spiffe_id: SpiffeId | None = verified_caller(context).spiffe_id
    except PeerUnauthenticated as exc:
        if exc.reason == Reason.NO_PEER_CERT:
            return f"peer:{call_peer(context)}"
        spiffe_id = None
    return bucket(spiffe_id, grants)


def certificate_key(context: grpc.ServicerContext, identity: str) -> str | None:
    """The :func:`certificate_bucket` of the certificate this RPC's caller, counted as
    ``identity`` (its :func:`caller_key`), presented; None when ``identity`` is no SPIFFE ID
    (:data:`ROLELESS`, which shares one bucket whatever its certificates, or a peer without a
    certificate, counted by its address): it then has no share beneath its caps."""
    if not identity.startswith("spiffe://"):
        return None
    try:
        serial = verified_caller(context).serial
    except PeerUnauthenticated:  # an identity named some other way (a test's identify)
        return None
    return certificate_bucket(identity, serial)


def identify_by_role(grants: Grants) -> Identify:
    """:func:`caller_key` with role-less callers (per ``grants``) counted as one."""
    return functools.partial(caller_key, grants=grants)


class Distrust:
    """Who is trusted no more beyond its data-plane bound (:meth:`UnaryGuard.wait_for_request`):
    a certificate (its :func:`certificate_bucket`) one of whose waits admitted on trust proved
    stalled, for :data:`DISTRUST_SECONDS`; its identity (:func:`bucket`) once
    :data:`DISTRUSTED_CERTIFICATES` of its certificates did, each within that long of the last.

    Keyed by SPIFFE ID alone, one replica's stall put its whole fleet (one SPIFFE ID) on
    refuse-at-once. Keyed by certificate alone, a replica renewing onto new serials at will got
    fresh trust with each, and held the data plane beyond its bound again and again: the
    identity's count is the backstop. A caller without a certificate of its own
    (:data:`ROLELESS`, a peer without a certificate) is distrusted as its identity, at once.
    Remembers :data:`MAX_CERTIFICATES_TRACKED` entries at most, the one distrusted longest ago
    forgotten first: a certificate forgotten is only trusted again, and its next stall counts
    towards its identity's again. Not locked: used under :attr:`WorkerShares.lock`."""

    def __init__(self, max_tracked: int = MAX_CERTIFICATES_TRACKED) -> None:
        # Key (a certificate's bucket, or an identity's) -> (until when, how many strikes): a
        # certificate's is distrusted with one, an identity with DISTRUSTED_CERTIFICATES.
        self._entries: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._max = max_tracked

    def __len__(self) -> int:
        return len(self._entries)

    def _strikes(self, key: str, now: float) -> int:
        until, strikes = self._entries.get(key, (0.0, 0))
        return strikes if until > now else 0

    def _put(self, key: str, until: float, strikes: int) -> None:
        self._entries[key] = (until, strikes)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def trusts(self, identity: str, certificate: str | None, now: float) -> bool:
        """Whether a wait of ``identity``'s ``certificate`` beyond its bound may be admitted on
        trust at ``now``."""
        if self._strikes(identity, now) >= DISTRUSTED_CERTIFICATES:
            return False
        return certificate is None or not self._strikes(certificate, now)

    def distrust(self, identity: str, certificate: str | None, now: float) -> None:
        """A wait of ``identity``'s ``certificate`` admitted on trust proved stalled at ``now``."""
        until = now + DISTRUST_SECONDS
        if certificate is None:
            self._put(identity, until, DISTRUSTED_CERTIFICATES)
            return
        # A certificate counts towards its identity once: a stuck replica's several stalled
        # waits are one replica's.
        fresh = not self._strikes(certificate, now)
        self._put(certificate, until, 1)
        self._put(identity, until, self._strikes(identity, now) + fresh)

    def expire(self, now: float) -> None:
        """Forgets what is trusted again at ``now`` (the table holds what is distrusted now)."""
        for key in [k for k, (until, _) in self._entries.items() if until <= now]:
            del self._entries[key]


class WorkerShares:
    """The split of a server's workers between data-plane and control-plane calls, and the
    data-plane workers one caller may hold.

    ``data_plane`` workers at most are held by data-plane calls, all callers together: unary
    calls (:class:`UnaryGuard`) and blocking streams (:class:`~strongroom.runtime.streams.StreamGuard`)
    of every method not in ``control_plane``, a set of full method names (``/pkg.Service/Method``)
    and service names (all of its methods). The rest of the workers stay free for control-plane
    calls. ``public`` names (the same way) the methods any certified caller may call (health):
    a wait for the request message of one of them is a data-plane wait even when the method is
    control plane, so that callers who never send their message cannot hold the reserve.

    ``per_identity`` (default: no bound beyond ``data_plane``) is how many of them one caller
    holds at most, whatever kinds they are: the per-kind caps (unary calls, streams) each bound
    one kind only, so that a caller at both held their sum, and two callers the whole data plane.
    :attr:`lock` also guards :class:`UnaryGuard`'s own counts, so that a call is admitted under
    one lock.

    A certificate (its :func:`certificate_bucket`, passed as ``certificate``) holds at most
    ``per_certificate`` of its identity's bound (never more than the bound; default: the whole
    bound, no share), so that one replica of a fleet sharing the identity cannot hold the fleet's
    whole bound.
    """

    def __init__(
        self,
        data_plane: int,
        control_plane: Iterable[str] = (),
        public: Iterable[str] = (),
        per_identity: int | None = None,
        per_certificate: int | None = None,
    ) -> None:
        if data_plane < 1:
            raise ValueError("data_plane must be at least 1")
        if per_identity is not None and per_identity < 1:
            raise ValueError("per_identity must be at least 1")
        if per_certificate is not None and per_certificate < 1:
            raise ValueError("per_certificate must be at least 1")
        self.data_plane = data_plane
        self.per_identity = per_identity if per_identity is not None else data_plane
        # No share unless asked for: a client of one certificate (a single-replica backend, a
        # benchmark's callers) would otherwise lose half of the bound configured for it.
        self.per_certificate = (
            self.per_identity
            if per_certificate is None
            else min(per_certificate, self.per_identity)
        )
        self._control = frozenset(control_plane)
        self._public = frozenset(public)
        self.lock = threading.Lock()
        self.held = 0
        """Data-plane workers held now (read and written under :attr:`lock`)."""
        self._mine: Counter[str] = Counter()  # counted workers per caller (under lock)
        # Counted workers per certificate (under lock): only while it holds any, so at most one
        # entry per worker whatever number of certificates call.
        self._certificates: Counter[str] = Counter()
        # Certificates (and identities) one of whose waits trusted beyond their bound proved
        # stalled (UnaryGuard.wait_for_request; under lock).
        self.distrust = Distrust()

    def is_control_plane(self, method: str) -> bool:
        """Whether ``method`` (a full method name) may use the control-plane reserve."""
        return _named(method, self._control)

    def is_public(self, method: str) -> bool:
        """Whether anyone may call ``method`` (health): its wait for its request message never
        comes out of the control-plane reserve (:meth:`UnaryGuard.wait_for_request`)."""
        return _named(method, self._public)

    def busy(self, method: str) -> ResourceExhausted:
        """The refusal of a data-plane call of ``method`` while every data-plane worker is held."""
        return ResourceExhausted(
            f"all {self.data_plane} data-plane workers are busy (server.max_workers less "
            "server.control_plane_workers, which only control-plane calls use); "
            f"{method} refused, retry later",
            reason=Reason.DATA_PLANE_WORKERS_BUSY,
        )

    def over_bound(self, identity: str, method: str) -> ResourceExhausted:
        """The refusal of a data-plane call of ``method`` while ``identity`` holds its bound."""
        return ResourceExhausted(
            f"{identity} already holds {self.per_identity} data-plane workers "
            "(server.max_data_plane_workers_per_identity: its unary calls, blocking streams and "
            f"waits for a request message together); {method} refused, retry later",
            reason=Reason.TOO_MANY_WORKERS_PER_IDENTITY,
        )

    def over_share(self, certificate: str, method: str) -> ResourceExhausted:
        """The refusal of a data-plane call of ``method`` while ``certificate`` holds its share."""
        # Named with its setting: a download refused here (its streams count in the share) told
        # the operator only of the bound, not of what sets the share.
        return ResourceExhausted(
            f"certificate {certificate} already holds {self.per_certificate} data-plane workers "
            "(server.max_calls_per_certificate: its unary calls, blocking streams and waits for a "
            f"request message together), its share of its identity's {self.per_identity} "
            "(server.max_data_plane_workers_per_identity, which its identity's other "
            f"certificates share); {method} refused, retry later",
            reason=Reason.TOO_MANY_CALLS_PER_CERTIFICATE,
        )

    def at_bound(self, identity: str, certificate: str | None = None) -> bool:
        """Whether ``identity`` holds its bound already, or ``certificate`` its share of it (call
        under :attr:`lock`)."""
        return self._mine[identity] >= self.per_identity or (
            certificate is not None and self._certificates[certificate] >= self.per_certificate
        )

    def refusal(
        self, identity: str, method: str, certificate: str | None = None
    ) -> ResourceExhausted | None:
        """Why a data-plane worker cannot go to ``identity`` now (its bound first, then its
        ``certificate``'s share of it, then the data plane), or None (call under :attr:`lock`)."""
        if self._mine[identity] >= self.per_identity:
            return self.over_bound(identity, method)
        if certificate is not None and self._certificates[certificate] >= self.per_certificate:
            return self.over_share(certificate, method)
        if self.held >= self.data_plane:
            return self.busy(method)
        return None

    def hold(self, identity: str, certificate: str | None = None) -> None:
        """Counts a data-plane worker to ``identity`` and ``certificate`` (under :attr:`lock`,
        after :meth:`refusal`)."""
        self.held += 1
        self._mine[identity] += 1
        if certificate is not None:
            self._certificates[certificate] += 1

    def release(self, identity: str, certificate: str | None = None) -> None:
        """Gives back a worker :meth:`hold` counted (under :attr:`lock`)."""
        self.held -= 1
        forget(self._mine, identity)
        if certificate is not None:
            forget(self._certificates, certificate)

    def take(self, method: str, identity: str, certificate: str | None = None) -> None:
        """Holds a data-plane worker for the blocking stream of ``method`` of ``identity``'s
        ``certificate`` (counted in its share as a unary call is); raises
        ``ResourceExhausted`` (``TOO_MANY_WORKERS_PER_IDENTITY``,
        ``TOO_MANY_CALLS_PER_CERTIFICATE``, ``DATA_PLANE_WORKERS_BUSY``)."""
        with self.lock:
            refusal = self.refusal(identity, method, certificate)
            if refusal is None:
                self.hold(identity, certificate)
                return
        raise refusal

    def give(self, identity: str, certificate: str | None = None) -> None:
        """Gives back a worker :meth:`take` held."""
        with self.lock:
            self.release(identity, certificate)

    def certificates_held(self) -> int:
        """Certificates holding a data-plane worker now (entries of the per-certificate table)."""
        with self.lock:
            return len(self._certificates)

    def held_now(self, identity: str | None = None) -> int:
        """Data-plane workers held now: all of them, or those counted to ``identity``."""
        with self.lock:
            return self.held if identity is None else self._mine[identity]


def _timed_out(method: str, bound: float, setting: str) -> ResourceExhausted:
    """What the logs and a refusal observer are told of a call the request watchdog cancelled
    (its caller sees ``CANCELLED``: no status can be set from the watchdog's thread)."""
    return ResourceExhausted(
        f"{method}: no request message within {bound:g}s ({setting}); the call was cancelled",
        reason=Reason.REQUEST_MESSAGE_TIMEOUT,
    )


def forget(counts: Counter[str], key: str) -> None:
    """Counts one less for ``key``, and forgets it at none (the tables hold what runs now, so
    that a key, a certificate minted at will included, costs nothing once it holds nothing)."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


def _named(method: str, names: frozenset[str]) -> bool:
    """Whether ``names`` holds the full method name ``method`` or the name of its service."""
    service = method[1:].split("/", 1)[0]
    return method in names or service in names


class UnaryGuard(HandlerInterceptor):
    """Admits a unary-unary RPC while its caller runs fewer than ``max_per_identity`` and, for a
    data-plane method, while a data-plane worker of ``shares`` is free; streams pass untouched
    (:class:`~strongroom.runtime.streams.StreamGuard` limits them).

    It goes after the authoriser (it counts verified callers, and a caller refused there holds no
    thread) and inside the error mapping, which answers its refusal and tells a method's refusal
    observer of it (the key broker audits a refused release)."""

    def __init__(
        self,
        max_per_identity: int,
        identify: Identify = caller_key,
        shares: WorkerShares | None = None,
        max_roleless_waits: int | None = None,
        public_wait: float | None = None,
        *,
        certify: Certify = certificate_key,
        request_wait: float | None = None,
        request_waits: Mapping[str, float | None] | None = None,
    ) -> None:
        if max_per_identity < 1:
            raise ValueError("max_per_identity must be at least 1")
        if max_roleless_waits is not None and max_roleless_waits < 1:
            raise ValueError("max_roleless_waits must be at least 1")
        self._max = max_per_identity
        # Names each call's certificate, for its share of the data-plane bound (WorkerShares).
        self._certify = certify
        # Waits for a request message that role-less callers (all together) may have at once;
        # None: their per-identity cap alone.
        self._max_roleless_waits = max_roleless_waits
        self._roleless_waits = 0
        # Seconds a public method's call may wait for its message before it is cancelled; None:
        # until its deadline. Waits being timed: context -> when it is cancelled.
        self._public_wait = public_wait
        # Seconds a call holding a data-plane worker may wait for its message (read_request);
        # None: until its deadline. Per method where named in request_waits (full method name):
        # one bound for all held a StatModel's wait for its few bytes as long as an upload
        # chunk's, and an inference ModelMetadata's as long as a 64 MiB tensor's (17 minutes).
        self._request_wait = request_wait
        self._request_waits = dict(request_waits or {})
        bounds = [
            b for b in (public_wait, request_wait, *self._request_waits.values()) if b is not None
        ]
        self._watch_period = max(0.05, min(bounds, default=1.0) / 4)
        self._timed: dict[grpc.ServicerContext, float] = {}
        self._late: set[grpc.ServicerContext] = set()  # past their bound: to be cancelled
        # Calls a watchdog cancelled before their handler took the message (_took): under the
        # lock, whichever comes first wins, so that no call is both processed and cancelled.
        self._cut: set[grpc.ServicerContext] = set()
        self._watchdog: threading.Thread | None = None
        self._closed = threading.Event()  # the watchdogs end (close)
        self._identify = identify
        # Without shares (a guard on its own), every method is data-plane and only the
        # per-identity cap binds.
        self.shares = shares or WorkerShares(1 << 30)
        self._lock = self.shares.lock
        self._running: Counter[str] = Counter()
        self._waiting: set[str] = set()  # callers whose one wait for a request is outside counts
        # Waits admitted beyond their caller's bound on trust: context -> (until when, caller);
        # those counted in the bound since, and those cancelled for stalling.
        self._trusted: dict[grpc.ServicerContext, tuple[float, str, str | None]] = {}
        self._promoted: set[grpc.ServicerContext] = set()
        self._stalled: set[grpc.ServicerContext] = set()
        # Workers each caller holds on trust now (admitted, neither counted since nor given back):
        # uncapped, one caller at its bound took every free data-plane worker on trust, and held
        # them until the trust watchdog acted (up to 1.25 s), twice on two certificates.
        self._on_trust: Counter[str] = Counter()
        # And each certificate, at most its share: capped per identity alone, one replica at its
        # share held the identity's whole bound again on trust beside it (only while it has any).
        self._on_trust_certificate: Counter[str] = Counter()
        self._trust_watchdog: threading.Thread | None = None
        # How long a wait admitted on trust may last (a test moves it to time the watchdog).
        self._trust_seconds = TRUSTED_WAIT_SECONDS

    def request_wait(self, method: str) -> float | None:
        """Seconds a data-plane call of ``method`` may wait for its request message
        (:meth:`read_request`); None: until its deadline."""
        return self._request_waits.get(method, self._request_wait)

    def running(self, identity: str) -> int:
        """Unary calls of ``identity`` whose handlers run now."""
        with self._lock:
            return self._running[identity]

    def _enter(
        self,
        identity: str,
        certificate: str | None,
        method: str,
        context: grpc.ServicerContext,
        data: bool,
    ) -> None:
        shares = self.shares
        refusal: ResourceExhausted | None = None
        with self._lock:
            # The caller's own caps first: a caller over one is told so, whatever the others hold;
            # then its certificate's share of its bound (a data-plane call), so that one replica
            # leaves its fleet the rest.
            over = self._running[identity] >= self._max
            if not over and data:
                refusal = shares.refusal(identity, method, certificate)
            if not over and refusal is None:
                self._running[identity] += 1
                if data:
                    shares.hold(identity, certificate)
                return
        self._refuse(identity, method, context, over, "unary call refused", exc=refusal)

    def _refuse(
        self,
        identity: str,
        method: str,
        context: grpc.ServicerContext,
        over: bool,
        what: str,
        *,
        exc: ResourceExhausted | None = None,
    ) -> NoReturn:
        if exc is None:
            exc = (
                ResourceExhausted(
                    f"{identity} already has {self._max} calls running "
                    f"(server.max_unary_calls_per_identity); {method} refused, retry later",
                    reason=Reason.TOO_MANY_UNARY_CALLS_PER_IDENTITY,
                )
                if over
                else self.shares.busy(method)
            )
        log.warning(
            what,
            extra={
                "method": method,
                "peer": context.peer(),
                "reason": exc.reason,
                REFUSAL_LINE: True,
            },
        )
        raise exc

    def roleless_waits(self) -> int:
        """Waits for a request message that role-less callers (:data:`ROLELESS`) have now."""
        with self._lock:
            return self._roleless_waits

    def wait_for_request(
        self, context: grpc.ServicerContext, method: str, read: Callable[[], Any]
    ) -> Any:
        """Returns ``read()``, the request message of a call that holds no data-plane worker (a
        control-plane call, a non-blocking stream), waited for within the caller's bounds.

        The message is read by the call's worker once the authoriser and the limits admitted it
        (:class:`~strongroom.runtime.interceptors.DeferredRequests`); a data-plane call waits
        within the data-plane worker it holds. These others hold none: each caller has one such
        wait outside the data plane for a method only authorised callers may call (an operator's
        call is never refused because the data plane is full; a message sent with the call's
        headers is there at once), and each further wait of the caller at the same time holds a
        data-plane worker while it lasts, or is refused at once with ``DATA_PLANE_WORKERS_BUSY``.
        A wait for a public method's message (health: any certificate of the CA, however many
        identities one holder has) is always such a data-plane wait: one wait per identity
        outside the data plane let N identities that never send their message hold N workers of
        the control-plane reserve, and with the data plane full the operator's calls queued
        behind them. The call itself already counts against its caller's cap (unary calls here,
        streams in :class:`~strongroom.runtime.streams.StreamGuard`).

        Callers the authoriser grants no role (:data:`ROLELESS`: any SPIFFE ID the CA signs for,
        however many) share one bucket, and their waits, all of them together, are capped at
        ``max_roleless_waits`` besides: each role-less identity held its own cap of health calls
        that never sent their message, so that two or three certificates held every data-plane
        worker. Role-holding callers are not touched: a burst of their health ``Watch`` calls
        waits (milliseconds, the message buffered) within their own cap and the data plane.

        A data-plane wait counts in its caller's bound across kinds
        (:attr:`WorkerShares.per_identity`) from its start. A caller at its bound has its further
        waits admitted on trust while the data plane has room, as many as its bound at once and
        its certificate no more than its share (a burst whose messages came with the calls ends
        at once); the watchdog counts one still
        waiting after :data:`TRUSTED_WAIT_SECONDS` in the bound if it fits there, or cancels it,
        and either way trusts its caller no more for :data:`DISTRUST_SECONDS`
        (``TOO_MANY_WORKERS_PER_IDENTITY``).
        """
        identity = self._identify(context)
        certificate = self._certify(context, identity)
        shares = self.shares
        roleless = identity == ROLELESS and self._max_roleless_waits is not None
        held: str | None = None  # _OWN, _COUNTED, _TRUSTED; None: refused
        refusal: ResourceExhausted | None = None
        with self._lock:
            if roleless and self._roleless_waits >= (self._max_roleless_waits or 0):
                refusal = ResourceExhausted(
                    f"callers without a role already wait for {self._max_roleless_waits} request "
                    f"messages (server.max_roleless_request_waits); {method} refused, retry "
                    "later or send the request message with the call",
                    reason=Reason.ROLELESS_CALLERS_BUSY,
                )
            elif identity not in self._waiting and not shares.is_public(method):
                held = _OWN
                self._waiting.add(identity)
            elif (refusal := shares.refusal(identity, method, certificate)) is None:
                held = _COUNTED
                shares.hold(identity, certificate)
            elif (
                shares.at_bound(identity, certificate)
                and shares.held < shares.data_plane
                # At most its bound again: (data-plane workers - 1) // 2 by default, so that a
                # caller at its bound with its waits on trust still leaves a worker to the others.
                and self._on_trust[identity] < shares.per_identity
                and (
                    certificate is None
                    or self._on_trust_certificate[certificate] < shares.per_certificate
                )
                and shares.distrust.trusts(identity, certificate, time.monotonic())
            ):
                # At its bound: trusted for a moment, since a message sent with the call (every
                # gRPC client's) is read at once; a burst of health calls is not refused for it.
                held = _TRUSTED
                refusal = None
                shares.held += 1
                self._on_trust[identity] += 1
                if certificate is not None:
                    self._on_trust_certificate[certificate] += 1
                self._trusted[context] = (
                    time.monotonic() + self._trust_seconds,
                    identity,
                    certificate,
                )
            if held is not None and roleless:
                self._roleless_waits += 1
        if held is None:
            self._refuse(
                identity,
                method,
                context,
                False,
                "call refused waiting for its request",
                exc=refusal,
            )
        timed = self._public_wait is not None and shares.is_public(method)
        waited = read_one = False  # whether the wait began, and whether it ended with a message
        try:  # whatever fails from here on gives back what was taken above
            if held == _TRUSTED:
                self._watch_trusted()
            if timed:
                self._time(context, self._public_wait or 0.0)
            waited = True
            request, cut = self._took(context, read)
            if cut is None:
                read_one = True
                return request
            if cut == _STALLED:
                raise ResourceExhausted(
                    f"{method}: no request message within {self._trust_seconds:g}s while "
                    f"{identity} held {shares.per_identity} data-plane workers "
                    "(server.max_data_plane_workers_per_identity); the call was cancelled",
                    reason=Reason.TOO_MANY_WORKERS_PER_IDENTITY,
                )
            raise _timed_out(method, self._public_wait or 0.0, "server.health_request_wait_seconds")
        finally:
            with self._lock:
                self._cut.discard(context)
                if timed:
                    self._timed.pop(context, None)
                    self._late.discard(context)
                if roleless:
                    self._roleless_waits -= 1
                if held == _OWN:
                    self._waiting.discard(identity)
                elif held == _COUNTED:
                    shares.release(identity, certificate)
                elif context in self._promoted:  # trusted, then counted once in its bound
                    self._promoted.discard(context)
                    shares.release(identity, certificate)
                else:
                    self._trusted.pop(context, None)
                    self._stalled.discard(context)
                    shares.held -= 1
                    self._off_trust(identity, certificate)
                    if waited and not read_one:
                        # Trusted, and ended without its message (its client cancelled it, the
                        # request watchdog did, a shorter health_request_wait_seconds): only the
                        # trust watchdog distrusted, so a caller ending each stalled wait before
                        # it was due and opening another held workers beyond its bound for good.
                        shares.distrust.distrust(identity, certificate, time.monotonic())

    def read_request(
        self, context: grpc.ServicerContext, method: str, read: Callable[[], Any]
    ) -> Any:
        """Returns ``read()``, the request message of a call that holds a data-plane worker
        already (a data-plane unary call, a blocking stream's one request), cancelled past
        :meth:`request_wait` of ``method`` (``server.request_wait_seconds``; by default what
        the method's own largest request needs) as a public method's wait is past
        its bound: one that never sent its message held its worker until its deadline or its
        connection's age (40 minutes), and the per-certificate share only bounds how many.
        What the logs and a refusal observer (the broker's audit) are told is
        ``REQUEST_MESSAGE_TIMEOUT``; its caller sees ``CANCELLED``."""
        bound = self.request_wait(method)
        if bound is None:
            return read()
        try:  # the watchdog may have taken the call (and failed to start): given back below
            self._time(context, bound)
            request, cut = self._took(context, read)
            if cut is None:
                return request
            raise _timed_out(method, bound, "server.request_wait_seconds")
        finally:
            with self._lock:
                self._timed.pop(context, None)
                self._late.discard(context)
                self._cut.discard(context)

    def _took(
        self, context: grpc.ServicerContext, read: Callable[[], Any]
    ) -> tuple[Any, str | None]:
        """``read()``'s request and None when the handler took it before any watchdog cancelled
        the call, which none does from then on; else None and why a watchdog did (:data:`_LATE`,
        :data:`_STALLED`): the call is then refused for that reason, its message unprocessed.

        The cancel and the handler's going on with the message were not exclusive: a message
        read just as the watchdog cancelled its call was processed (a ReleaseKey granted and
        audited allowed) for a caller that never got the answer. Each claims the call under the
        lock now, the watchdog by cancelling it (only while it still waits), the handler here."""
        try:
            request = read()
        except (Cancelled, DeadlineExceeded, InvalidArgument):
            # A watchdog's cancel reaches the read as the call's cancellation or, in about one
            # run of three, first as the end of its request stream (gRPC completes the pending
            # read empty before it records the cancel): the watchdog's reason is the call's
            # either way, else the read's own refusal stands.
            with self._lock:
                cut = self._watchdogs_reason(context)
            if cut is None:
                raise
            return None, cut
        with self._lock:
            cut = self._watchdogs_reason(context)
            if cut is None:  # the handler's: no watchdog may cancel the call any more
                self._timed.pop(context, None)
                self._late.discard(context)
                self._trusted.pop(context, None)
                self._stalled.discard(context)
        return (request if cut is None else None), cut

    def _off_trust(self, identity: str, certificate: str | None) -> None:
        """Counts one wait less on trust for ``identity`` and ``certificate`` (under the lock)."""
        forget(self._on_trust, identity)
        if certificate is not None:
            forget(self._on_trust_certificate, certificate)

    def _watchdogs_reason(self, context: grpc.ServicerContext) -> str | None:
        """Why a watchdog cancelled ``context`` (:data:`_STALLED`, :data:`_LATE`), or None if
        none did (call under the lock)."""
        if context not in self._cut:
            return None
        return _STALLED if context in self._stalled else _LATE

    def _watch_trusted(self) -> None:
        """Starts the watchdog of trusted waits unless it runs or the server stopped.

        Called within the wait's accounting, so that a thread that cannot be had fails the call
        with nothing held; the thread is kept only once started, so the next wait tries again."""
        with self._lock:
            if self._trust_watchdog is None and not self._closed.is_set():
                watchdog = threading.Thread(
                    target=self._watch_trust, name="trusted-wait-watchdog", daemon=True
                )
                watchdog.start()  # may fail (no thread to be had): the next wait tries again
                self._trust_watchdog = watchdog

    def _watch_trust(self) -> None:
        # A trusted wait still waiting once its moment is over is counted in its caller's bound
        # if it now fits there; otherwise it is cancelled (gRPC Python has no timed read, and no
        # status can be set from another thread: its caller sees CANCELLED). Either way its
        # caller is trusted no more for DISTRUST_SECONDS, so that stalled waits cannot be
        # renewed past the bound.
        shares = self.shares
        while not self._closed.wait(TRUSTED_WAIT_SECONDS / 4):
            now = time.monotonic()
            cancel: list[grpc.ServicerContext] = []
            with self._lock:
                shares.distrust.expire(now)
                due = [
                    (c, who, cert) for c, (when, who, cert) in self._trusted.items() if now >= when
                ]
                for context, identity, certificate in due:
                    del self._trusted[context]
                    # Distrusted even when its wait now fits the bound: a caller that let its
                    # older waits go just before this moment had its stalled ones counted, and
                    # its next ones trusted beyond the bound again, holding twice its bound
                    # for as long as it kept that turn.
                    shares.distrust.distrust(identity, certificate, now)
                    if not shares.at_bound(identity, certificate):
                        shares.held -= 1  # counted again, in its caller's bound, by hold()
                        shares.hold(identity, certificate)
                        self._off_trust(identity, certificate)
                        self._promoted.add(context)
                    else:
                        self._stalled.add(context)
                        cancel.append(context)
            for context in cancel:
                self._cancel_waiting(
                    context,
                    "cancelling a call: no request message while its caller holds its bound",
                    Reason.TOO_MANY_WORKERS_PER_IDENTITY,
                    self._stalled,
                )

    def _time(self, context: grpc.ServicerContext, bound: float) -> None:
        """Has the watchdog cancel ``context`` unless its wait ends within ``bound`` seconds."""
        with self._lock:
            self._timed[context] = time.monotonic() + bound
            if self._watchdog is None and not self._closed.is_set():
                watchdog = threading.Thread(
                    target=self._watch_waits, name="request-watchdog", daemon=True
                )
                watchdog.start()  # may fail (no thread to be had): the next wait tries again
                self._watchdog = watchdog

    def _watch_waits(self) -> None:
        # gRPC Python has no timed read; cancelling the RPC from another thread makes the blocked
        # read raise (the caller sees CANCELLED: no status can be set from here).
        while not self._closed.wait(self._watch_period):
            now = time.monotonic()
            with self._lock:
                late = [c for c, when in self._timed.items() if now >= when]
                for context in late:
                    del self._timed[context]
                    self._late.add(context)
            for context in late:
                self._cancel_waiting(
                    context,
                    "cancelling a call: no request message",
                    Reason.REQUEST_MESSAGE_TIMEOUT,
                    self._late,
                )

    def _cancel_waiting(
        self,
        context: grpc.ServicerContext,
        message: str,
        reason: str,
        waiting: set[grpc.ServicerContext],
    ) -> None:
        """Logs, then cancels, a call a watchdog found waiting for its request message too long
        (``waiting``: the watchdog's set of such calls), if it still waits then."""
        log.warning(
            message,
            extra={
                "peer": context.peer(),
                "reason": reason,
                # Its caller chose how many there are: within its budget, with the call's own
                # lines (this thread runs no call of its own).
                REFUSAL_LINE: True,
                REFUSAL_CALL: context,
            },
        )
        # Only while it still waits: its message may have come since (the log line can take
        # long on a slow pipe), and the call, a Watch now serving its caller, runs on. Under the
        # lock its handler takes the message with (_took), leaving ``waiting``: a handler that
        # read it after this cancel refuses the call instead of going on. (Cancelling only marks
        # the call in gRPC core: its callbacks run on gRPC's thread later, none under this lock.)
        with self._lock:
            if context not in waiting:
                return
            self._cut.add(context)  # the watchdog's, whatever the read returns now
            cancel: Callable[[], object] = context.cancel  # untyped in grpc-stubs
            cancel()

    def close(self) -> None:
        """Ends the watchdog threads, of timed waits and of trusted ones (the server stopped: no
        call waits any more). They ran for the life of the process, each stopped server's guard
        leaving them behind, held with all they reference."""
        self._closed.set()
        for watchdog in (self._watchdog, self._trust_watchdog):
            if watchdog is not None:
                watchdog.join(10)

    def _leave(self, identity: str, certificate: str | None, data: bool) -> None:
        with self._lock:
            forget(self._running, identity)
            if data:
                self.shares.release(identity, certificate)

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler:
        """A unary-unary ``handler`` admitted within the limits; any other as it is."""
        behaviour = handler.unary_unary
        if behaviour is None:
            return handler
        method = details.method
        data = not self.shares.is_control_plane(method)  # decided once per method

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            identity = self._identify(context)
            certificate = self._certify(context, identity)
            self._enter(identity, certificate, method, context, data)
            try:
                return behaviour(request, context)
            finally:
                self._leave(identity, certificate, data)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
