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
from collections.abc import Iterator

import pytest

from strongroom.attestation import collateral_fetch
from strongroom.attestation.abi.snp import TcbVersion, parse_snp_report
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.collateral_fetch import CollateralService, FetchSettings
from strongroom.errors import StrongroomError
from strongroom.keybroker import fetch_budget
from strongroom.keybroker.refusals import callers_fault
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
            outcomes[i] = exc.reason if callers_fault(exc) else f"{exc.reason} (unbudgeted)"

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
    assert callers_fault(refused.value)
    assert server.requests == []


def test_a_callers_vcek_fetches_are_budgeted_in_rate_not_only_in_number_at_once(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, monkeypatch
) -> None:
    """Fetches at once were bounded (COLLATERAL_FETCH_BUSY) and each failure remembered for a
    minute, but a caller naming a new made-up chip in every report had KDS asked at its own pace.
    Each caller now has a budget of fetches (burst, then a rate), refused past it with no request;
    another caller, and fetches outside any caller's verification, are not held back."""
    monkeypatch.setattr(fetch_budget, "VCEK_FETCH_BURST", 3)
    now = [0.0]
    settings = FetchSettings(kds_url=server.url, pcs_url=server.url, retries=0)
    service = CollateralService(
        CollateralCache(tmp_path, sim_trust),
        settings,
        vcek_fetch_gate=fetch_budget.VcekFetchBudget(lambda: now[0]),
    )
    snp = authority.snp()
    chips = iter(bytes([i + 1]) * 64 for i in range(100))

    def ask(caller: str | None) -> str:
        report = parse_snp_report(snp.report(RD, measurement=MEAS, chip_id=next(chips)))
        with fetch_budget.fetching_for(caller) if caller else contextlib.nullcontext():
            try:
                service.snp_key_certificate(report)
            except StrongroomError as exc:
                assert callers_fault(exc)  # recorded against the caller's budget
                return exc.reason
        return "vcek"

    assert [ask("spiffe://t/a") for _ in range(5)] == ["VCEK_NOT_FOUND"] * 3 + [
        "COLLATERAL_FETCH_RATE_LIMITED"
    ] * 2
    assert len(server.requests) == 3  # the refused ones asked KDS nothing
    assert ask("spiffe://t/b") == "VCEK_NOT_FOUND"  # another caller has its own budget
    assert ask(None) == "VCEK_NOT_FOUND"  # not a caller's verification: not budgeted
    now[0] += 1.0 / fetch_budget.VCEK_FETCH_RATE  # one more a second
    assert [ask("spiffe://t/a") for _ in range(2)] == [
        "VCEK_NOT_FOUND",
        "COLLATERAL_FETCH_RATE_LIMITED",
    ]
    assert len(server.requests) == 6


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
    fleet = "spiffe://t/fleet"

    def ask(chip: bytes) -> str:
        report = parse_snp_report(snp.report(RD, measurement=MEAS, chip_id=chip))
        with fetch_budget.fetching_for(fleet):
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
