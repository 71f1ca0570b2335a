"""What reports with made-up chip ids can make the broker fetch from AMD KDS.

A caller named in a policy can send SEV-SNP reports without a VCEK, each naming any chip id: the
broker fetches that chip's VCEK (10 s timeout, retries) on the request's thread before anything
about the report is verified. The memory of failed fetches is keyed by chip and TCB, so new chip
ids each cost a fetch, and nothing bounded how many ran at once: enough of them held every worker
thread (starving every other release) and could get the broker rate-limited by KDS. Now one fetch
runs per chip and a few at once overall; further requests are refused UNAVAILABLE
``COLLATERAL_FETCH_BUSY`` at once, without a request to KDS.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator

import pytest

from strongroom.attestation import collateral_fetch
from strongroom.attestation.abi.snp import TcbVersion, parse_snp_report
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.collateral_fetch import CollateralService, FetchSettings
from strongroom.errors import StrongroomError, caused_by_caller
from strongroom.keybroker import fetch_budget
from strongroom.reasons import Reason
from tests.attestation.collateral_server import FakeCollateralServer, serve

RD = hashlib.sha512(b"fetch limits").digest()
MEAS = bytes(range(48))
SLOW = 1.0  # seconds KDS takes to answer: the fetches started together overlap


@pytest.fixture
def server() -> Iterator[FakeCollateralServer]:
    yield from serve()


def _service(server: FakeCollateralServer, tmp_path, sim_trust) -> CollateralService:  # type: ignore[no-untyped-def]
    settings = FetchSettings(
        kds_url=server.url, pcs_url=server.url, retries=0, timeout_seconds=10.0
    )
    return CollateralService(CollateralCache(tmp_path, sim_trust), settings)


def _together(service: CollateralService, reports: list[bytes]) -> list[str]:
    """Asks for the VCEK of each report at once, one thread each: what each got (the refusal's
    reason; a KDS 404 is VCEK_NOT_FOUND)."""
    barrier = threading.Barrier(len(reports))
    outcomes = [""] * len(reports)

    def ask(i: int) -> None:
        report = parse_snp_report(reports[i])
        barrier.wait()
        try:
            outcomes[i] = "none" if service.snp_key_certificate(report) is None else "vcek"
        except StrongroomError as exc:
            # Every refusal here is brought on by the requests (made-up chips): its audit record
            # must count against the caller's budget, or such reports fill the log unbounded.
            outcomes[i] = exc.reason if caused_by_caller(exc) else f"{exc.reason} (unbudgeted)"

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(reports))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return sorted(outcomes)


def test_made_up_chip_ids_get_a_few_kds_fetches_at_once_and_are_refused_beyond(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(collateral_fetch, "MAX_VCEK_FETCHES", 2, raising=False)
    service = _service(server, tmp_path, sim_trust)
    server.delay = SLOW
    snp = authority.snp()
    reports = [snp.report(RD, measurement=MEAS, chip_id=bytes([i + 1]) * 64) for i in range(6)]
    outcomes = _together(service, reports)
    assert outcomes == [Reason.COLLATERAL_FETCH_BUSY] * 4 + [Reason.VCEK_NOT_FOUND] * 2
    assert len(server.requests) == 2
    # The slots are free again once the fetches are done.
    server.delay = 0
    another = snp.report(RD, measurement=MEAS, chip_id=b"\x63" * 64)
    with pytest.raises(StrongroomError) as refused:
        service.snp_key_certificate(parse_snp_report(another))
    assert refused.value.reason == Reason.VCEK_NOT_FOUND
    assert len(server.requests) == 3


def test_one_fetch_per_chip_at_once_whatever_the_tcb(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path
) -> None:
    """The memory of failures is keyed by chip and TCB (a 404 for one TCB says nothing of
    another), so one chip id with many TCBs was as many concurrent fetches."""
    service = _service(server, tmp_path, sim_trust)
    server.delay = SLOW
    snp = authority.snp()
    chip = b"\x07" * 64
    reports = [
        snp.report(
            RD,
            measurement=MEAS,
            chip_id=chip,
            reported_tcb=TcbVersion.from_components(bootloader=4, tee=0, snp=20 + i, microcode=219),
        )
        for i in range(3)
    ]
    assert _together(service, reports) == ["COLLATERAL_FETCH_BUSY"] * 2 + ["VCEK_NOT_FOUND"]
    assert len(server.requests) == 1


def test_a_report_that_does_not_name_its_product_is_refused_without_a_fetch(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path
) -> None:
    """A version-2 report without its VCEK cannot say which product's KDS endpoint serves it: it
    was COLLATERAL_MISSING, the broker's own failure, so each one was an audit record outside the
    caller's refusal budget. It is the evidence's fault: VCEK_CERTIFICATE_MISSING."""
    service = _service(server, tmp_path, sim_trust)
    report = parse_snp_report(authority.snp().report(RD, measurement=MEAS, version=2))
    assert report.product is None
    with pytest.raises(StrongroomError) as refused:
        service.snp_key_certificate(report)
    assert (refused.value.reason, refused.value.status_name) == (
        "VCEK_CERTIFICATE_MISSING",
        "INVALID_ARGUMENT",
    )
    assert caused_by_caller(refused.value)
    assert server.requests == []


def _budgeted(server, tmp_path, sim_trust, now: list[float]) -> CollateralService:  # type: ignore[no-untyped-def]
    """A collateral service asking ``fetch_budget``'s gate, paced by ``now``."""
    settings = FetchSettings(kds_url=server.url, pcs_url=server.url, retries=0)
    return CollateralService(
        CollateralCache(tmp_path, sim_trust),
        settings,
        vcek_fetch_gate=fetch_budget.VcekFetchBudget(lambda: now[0]),
    )


def _asker(authority, service: CollateralService) -> Callable[[tuple[str, int] | None], str]:  # type: ignore[no-untyped-def]
    """Asks for the VCEK of a report naming a new made-up chip, as the caller's certificate
    (SPIFFE ID, serial) or outside any caller's verification (None): what it got."""
    snp = authority.snp()
    chips = iter(bytes([i % 250 + 1, i // 250]) * 32 for i in range(10_000))

    def ask(caller: tuple[str, int] | None) -> str:
        report = parse_snp_report(snp.report(RD, measurement=MEAS, chip_id=next(chips)))
        with fetch_budget.fetching_for(*caller) if caller else contextlib.nullcontext():
            try:
                service.snp_key_certificate(report)
            except StrongroomError as exc:
                assert caused_by_caller(exc)  # recorded against the caller's budget
                return exc.reason
        return "vcek"

    return ask


def test_a_callers_vcek_fetches_are_budgeted_in_rate_not_only_in_number_at_once(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, monkeypatch
) -> None:
    """Fetches at once were bounded (COLLATERAL_FETCH_BUSY) and each failure remembered for a
    minute, but a caller naming a new made-up chip in every report had KDS asked at its own pace.
    Each caller (its SPIFFE ID, all its certificates together) now has a budget of fetches
    (burst, then a rate), refused past it with no request; another caller, and fetches outside
    any caller's verification, are not held back."""
    monkeypatch.setattr(fetch_budget, "VCEK_FETCH_BURST", 3)
    now = [0.0]
    ask = _asker(authority, _budgeted(server, tmp_path, sim_trust, now))
    fleet = iter(("spiffe://t/a", serial) for serial in range(1, 100))  # a certificate each
    assert [ask(next(fleet)) for _ in range(5)] == ["VCEK_NOT_FOUND"] * 3 + [
        "COLLATERAL_FETCH_RATE_LIMITED"
    ] * 2
    assert len(server.requests) == 3  # the refused ones asked KDS nothing
    assert ask(("spiffe://t/b", 1)) == "VCEK_NOT_FOUND"  # another caller has its own budget
    assert ask(None) == "VCEK_NOT_FOUND"  # not a caller's verification: not budgeted
    now[0] += 1.0 / fetch_budget.VCEK_FETCH_RATE  # one more a second
    assert [ask(next(fleet)) for _ in range(2)] == [
        "VCEK_NOT_FOUND",
        "COLLATERAL_FETCH_RATE_LIMITED",
    ]
    assert len(server.requests) == 6


def test_one_replica_cannot_spend_its_fleets_vcek_fetch_budget(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path
) -> None:
    """The budget was per SPIFFE ID, which a fleet's replicas share: one replica naming a
    made-up chip in every report spent the fleet's 64 at once and then its one a second, and a
    genuine replica on a new chip (or after a TCB update) had its VCEK fetch refused
    COLLATERAL_FETCH_RATE_LIMITED for as long as that went on. Each certificate has 4 at once,
    then one a minute, beneath its SPIFFE ID's 64 and one a second: the bad replica is refused
    past its own, and the rest of the fleet still fetches (the documented numbers, unpatched)."""
    now = [0.0]
    ask = _asker(authority, _budgeted(server, tmp_path, sim_trust, now))
    bad, other = ("spiffe://t/fleet", 0x2A), ("spiffe://t/fleet", 0x2B)
    burst = fetch_budget.VCEK_FETCH_CERTIFICATE_BURST
    flood = [ask(bad) for _ in range(fetch_budget.VCEK_FETCH_BURST + 8)]
    assert flood == ["VCEK_NOT_FOUND"] * burst + ["COLLATERAL_FETCH_RATE_LIMITED"] * (
        len(flood) - burst
    )
    assert len(server.requests) == burst
    assert ask(other) == "VCEK_NOT_FOUND"  # before: COLLATERAL_FETCH_RATE_LIMITED
    # A second later the bad replica still has nothing (one a minute), the fleet its one more.
    now[0] += 1.0
    assert ask(bad) == "COLLATERAL_FETCH_RATE_LIMITED"
    now[0] += 1.0 / fetch_budget.VCEK_FETCH_CERTIFICATE_RATE
    assert ask(bad) == "VCEK_NOT_FOUND"
    assert ask(bad) == "COLLATERAL_FETCH_RATE_LIMITED"


def test_a_replica_minting_certificates_is_bounded_by_its_spiffe_ids_budget(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path
) -> None:
    """A replica holding its service's provisioner (or renewing onto new keys) gets a budget
    per certificate it mints: the SPIFFE ID's budget bounds them all, 64 at once as before; a
    certificate refused there keeps its own budget whole (nothing was fetched)."""
    now = [0.0]
    ask = _asker(authority, _budgeted(server, tmp_path, sim_trust, now))
    burst = fetch_budget.VCEK_FETCH_CERTIFICATE_BURST
    minted = [
        ("spiffe://t/fleet", 0x100 + i) for i in range(fetch_budget.VCEK_FETCH_BURST // burst)
    ]
    assert {ask(certificate) for certificate in minted for _ in range(burst)} == {"VCEK_NOT_FOUND"}
    newest = ("spiffe://t/fleet", 0x200)
    assert ask(newest) == "COLLATERAL_FETCH_RATE_LIMITED"
    assert len(server.requests) == fetch_budget.VCEK_FETCH_BURST
    now[0] += burst / fetch_budget.VCEK_FETCH_RATE  # the fleet's budget refills; not the minted
    assert [ask(newest) for _ in range(burst + 1)] == ["VCEK_NOT_FOUND"] * burst + [
        "COLLATERAL_FETCH_RATE_LIMITED"
    ]


def test_a_fetch_refused_busy_spends_none_of_the_callers_budget(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, monkeypatch
) -> None:
    """The budget was asked before a fetch slot was taken, so every COLLATERAL_FETCH_BUSY spent a
    fetch that never happened: the VMs of one host (one chip) starting together, or a fleet's
    machines past the slots, used up the fleet's burst on refusals and were then refused
    COLLATERAL_FETCH_RATE_LIMITED at 1 a second. Only a request that goes to KDS is counted."""
    monkeypatch.setattr(fetch_budget, "VCEK_FETCH_BURST", 2)
    settings = FetchSettings(kds_url=server.url, pcs_url=server.url, retries=0)
    service = CollateralService(
        CollateralCache(tmp_path, sim_trust),
        settings,
        vcek_fetch_gate=fetch_budget.VcekFetchBudget(lambda: 0.0),  # no refill meanwhile
    )
    snp = authority.snp()
    fleet = ("spiffe://t/fleet", 0x2A)

    def ask(chip: bytes) -> str:
        report = parse_snp_report(snp.report(RD, measurement=MEAS, chip_id=chip))
        with fetch_budget.fetching_for(*fleet):
            try:
                service.snp_key_certificate(report)
            except StrongroomError as exc:
                return exc.reason
        return "vcek"

    host = b"\x11" * 64
    server.hold = threading.Event()
    first: list[str] = []
    fetching = threading.Thread(target=lambda: first.append(ask(host)))
    fetching.start()
    try:
        assert server.arrived.acquire(timeout=30)  # the first VM's fetch is at KDS
        # The host's other VMs, while its chip's VCEK is being fetched: refused, nothing spent.
        assert [ask(host) for _ in range(3)] == ["COLLATERAL_FETCH_BUSY"] * 3
    finally:
        server.hold.set()
        fetching.join(30)
    assert first == ["VCEK_NOT_FOUND"]
    server.hold = None
    # The budget still has the fetch the refusals did not make (before: RATE_LIMITED).
    assert ask(b"\x22" * 64) == "VCEK_NOT_FOUND"
    assert ask(b"\x33" * 64) == "COLLATERAL_FETCH_RATE_LIMITED"
    assert len(server.requests) == 2
