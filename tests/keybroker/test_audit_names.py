"""The broker's start and ``strongroom audit verify DIR`` judge one audit directory alike.

They read its names by two definitions that disagreed (:mod:`strongroom.keybroker.audit_names`
is now the one): a sealed name with leading zeros was ignored by the broker and read by its
numbers by ``audit verify`` (``audit.log.3-5`` renamed ``audit.log.03-05``: tampering for one, an
intact series for the other; a stray ``audit.log.007-010``: a clean start, HEAD_MISSING or
RECORD_MALFORMED); a symbolic link under a sealed name was AUDIT_UNAVAILABLE for the broker and
followed out of the directory by ``audit verify``, which then called the series intact. Each odd
directory below goes through both, the real broker's open and the real command, and both must
reach the row's verdict.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.cli.main import build_parser, run_command
from strongroom.errors import DataLoss
from strongroom.keybroker.audit import AuditLog, head_path, load_signing_key, new_signing_key
from strongroom.keybroker.audit_names import list_sealed
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.keybroker.errors import AuditUnavailable
from strongroom.runtime.secrets import Secret

from .test_audit import event
from .test_audit_start import _make_series

Odd = Callable[[Path, Path], None]  # (audit directory, a directory beside it) -> None


def _rename_pair(old: str, new: str) -> Odd:
    def odd(directory: Path, _: Path) -> None:
        for suffix in ("", ".head"):
            os.rename(directory / (old + suffix), directory / (new + suffix))

    return odd


def _junk(name: str, *, oldest_shipped: bool = True) -> Odd:
    """A file ``name`` holding junk; with ``oldest_shipped``, audit.log.0-2 shipped before."""

    def odd(directory: Path, _: Path) -> None:
        if oldest_shipped:
            for suffix in ("", ".head"):
                (directory / ("audit.log.0-2" + suffix)).unlink()
        (directory / name).write_bytes(b"junk\n")

    return odd


def _deleted(name: str) -> Odd:
    def odd(directory: Path, _: Path) -> None:
        (directory / name).unlink()

    return odd


def _link_out(name: str) -> Odd:
    """``name`` moved out of the directory, a symbolic link to it left in its place: what it
    points to is the genuine file, so following it found nothing wrong."""

    def odd(directory: Path, outside: Path) -> None:
        shutil.move(directory / name, outside / name)
        (directory / name).symlink_to(outside / name)

    return odd


def _fifo(name: str) -> Odd:
    """``name`` replaced by a FIFO: opened, it is neither waited on nor read."""

    def odd(directory: Path, _: Path) -> None:
        (directory / name).unlink()
        os.mkfifo(directory / name)

    return odd


def _link_in(directory: Path, _: Path) -> None:
    os.rename(directory / "audit.log.0-2", directory / "kept")
    (directory / "audit.log.0-2").symlink_to("kept")


def _headless_link_first(directory: Path, outside: Path) -> None:
    for suffix in ("", ".head"):
        (directory / ("audit.log.0-2" + suffix)).unlink()
    (outside / "anything").write_bytes(b"junk\n")
    (directory / "audit.log.0-0").symlink_to(outside / "anything")


def _unwritten_head(directory: Path, _: Path) -> None:
    """A crash in a rotation between creating the new log and writing its first head (or in a
    first start, after creating the log): the broker's next start writes the head."""
    (directory / "audit.log").write_bytes(b"")
    (directory / "audit.log.head").unlink()


def _rotation_cut(*, new_log: bool = False, sealed_cut: bool = False) -> Odd:
    """The rotation that sealed audit.log.6-8 cut between its two renames: the log renamed, its
    sealed head still audit.log.head (the files a crash there left; the next log, with 9..10,
    never made). ``new_log``: an empty audit.log beside them (another replica's start creates
    it); ``sealed_cut``: the renamed log's last record cut off too (tampering)."""

    def odd(directory: Path, _: Path) -> None:
        for name in ("audit.log", "audit.log.head"):
            (directory / name).unlink()
        os.rename(directory / "audit.log.6-8.head", directory / "audit.log.head")
        if new_log:
            (directory / "audit.log").write_bytes(b"")
        if sealed_cut:
            sealed = directory / "audit.log.6-8"
            sealed.write_bytes(b"".join(sealed.read_bytes().splitlines(keepends=True)[:2]))

    return odd


def _dir_first(directory: Path, _: Path) -> None:
    for suffix in ("", ".head"):
        (directory / ("audit.log.0-2" + suffix)).unlink()
    (directory / "audit.log.0-0").mkdir()


# (what is done to the series audit.log.0-2, .3-5, .6-8 + audit.log, the verdict both must reach,
# the name both must give). Verdicts: "intact"; "shipping" (the broker starts with a WARNING
# naming it, audit verify leaves it out naming it); "tampered" (the broker does not start:
# AUDIT_LOG_TAMPERED; audit verify: NOT intact, exit 2); "unavailable" (the broker does not start:
# AUDIT_UNAVAILABLE; audit verify: the same error, exit 1).
CASES: dict[str, tuple[Odd | None, str, str]] = {
    "untouched": (None, "intact", ""),
    "zeros-stray-after": (_junk("audit.log.007-010", oldest_shipped=False), "tampered", "007-010"),
    "zeros-renamed-middle": (_rename_pair("audit.log.3-5", "audit.log.03-05"), "tampered", "03-05"),
    "zeros-renamed-oldest": (_rename_pair("audit.log.0-2", "audit.log.00-2"), "tampered", "00-2"),
    "zeros-headless-first": (_junk("audit.log.00-02"), "tampered", "audit.log.00-02"),
    "zeros-logless-first": (_junk("audit.log.000-1.head"), "tampered", "audit.log.000-1.head"),
    "reversed-range-first": (_junk("audit.log.2-0"), "tampered", "audit.log.2-0"),
    "digits-past-19": (
        _junk("audit.log.0-" + "9" * 20, oldest_shipped=False),
        "tampered",
        "9" * 20,
    ),
    "link-out-middle-log": (_link_out("audit.log.3-5"), "unavailable", "audit.log.3-5"),
    "link-out-middle-head": (
        _link_out("audit.log.3-5.head"),
        "unavailable",
        "audit.log.3-5.head",
    ),
    "fifo-middle-head": (_fifo("audit.log.3-5.head"), "unavailable", "audit.log.3-5.head"),
    "link-in-oldest": (_link_in, "unavailable", "audit.log.0-2"),
    "junk-headless-first": (_junk("audit.log.0-0"), "shipping", "audit.log.0-0"),
    "junk-logless-first": (_junk("audit.log.0-1.head"), "shipping", "audit.log.0-1"),
    "directory-first": (_dir_first, "shipping", "audit.log.0-0"),
    "link-headless-first": (_headless_link_first, "shipping", "audit.log.0-0"),
    # The active log empty without its head: the broker starts (it writes the head, continuing
    # the last sealed file); audit verify called it HEAD_MISSING (tampering).
    "active-log-head-unwritten": (_unwritten_head, "intact", ""),
    # With records, it is tampering for both (its head deleted: what it anchored is unknown).
    "active-log-headless": (_deleted("audit.log.head"), "tampered", "head is missing"),
    # A rotation cut between its renames: the broker's start finishes it; audit verify called it
    # TAIL_TRUNCATED (tampering) at audit.log. Now it judges the files as the broker will (NOTED).
    "rotation-cut-between-renames": (_rotation_cut(), "intact", ""),
    "rotation-cut-new-log-empty": (_rotation_cut(new_log=True), "intact", ""),
    # The same with the renamed log cut short is still tampering for both, naming that file.
    "rotation-cut-sealed-truncated": (_rotation_cut(sealed_cut=True), "tampered", "audit.log.6-8"),
    # Another log's names: the broker reads only its own log's (audit.log), and so does audit
    # verify told it (--log-name); it names what it left out (IGNORED). Not told, it asks: which
    # of two logs is the broker's is not for the directory's writer to choose.
    "renamed-to-another-log": (_rename_pair("audit.log.3-5", "zz.3-5"), "tampered", "seq 3..5"),
    "another-logs-stray": (_junk("foo.01-2", oldest_shipped=False), "intact", ""),
    "another-logs-pair": (_rename_pair("audit.log.0-2", "old.log.0-2"), "intact", ""),
}
# What audit verify must also say (the broker's start says nothing above INFO of these).
NOTED = {
    "rotation-cut-between-renames": "a rotation was interrupted between its renames",
    "rotation-cut-new-log-empty": "a rotation was interrupted between its renames",
    "rotation-cut-sealed-truncated": "a rotation was interrupted between its renames",
}
IGNORED = {
    "renamed-to-another-log": "zz.3-5",
    "another-logs-stray": "foo.01-2",
    "another-logs-pair": "old.log.0-2",
}


def _broker(log_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture) -> str:
    """The broker's start: its verdict and what it said."""
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING), AuditLog.open(log_path, key):
            pass
    except DataLoss as exc:
        assert exc.reason == "AUDIT_LOG_TAMPERED"
        return f"tampered {exc.message}"
    except AuditUnavailable as exc:
        return f"unavailable {exc.message}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    shipping = [w for w in warnings if "being shipped" in w]
    return f"shipping {shipping}" if shipping else f"intact {warnings}"


def _verify(directory: Path, public: Path, capsys: pytest.CaptureFixture[str], *told: str) -> str:
    """``strongroom audit verify DIR --public-key PEM [--log-name NAME]``: its verdict and what
    it printed ("ambiguous": several logs, it asks for --log-name)."""
    capsys.readouterr()
    args = build_parser().parse_args(
        ["audit", "verify", str(directory), "--public-key", str(public), *told]
    )
    code = run_command(lambda: args.func(args))
    out, err = capsys.readouterr()
    if code == 2:
        return f"tampered {err}"
    if code == 1 and "INVALID_ARGUMENT" in err:
        assert "name the one to check with --log-name" in err, err
        return f"ambiguous {err}"
    if code == 1:
        assert "AUDIT_UNAVAILABLE" in err, err
        return f"unavailable {err}"
    assert code == 0, (code, out, err)
    return f"shipping {out}" if "being shipped" in out else f"intact {out}"


@pytest.mark.parametrize("case", list(CASES))
def test_the_broker_and_audit_verify_judge_an_odd_directory_alike(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    odd, expected, named = CASES[case]
    private_pem, public_pem = new_signing_key()
    key = load_signing_key(Secret(private_pem))
    public = tmp_path / "audit.pub.pem"
    public.write_bytes(public_pem)
    directory, outside = tmp_path / "audit", tmp_path / "outside"
    directory.mkdir()
    outside.mkdir()
    log_path = directory / "audit.log"
    _make_series(log_path, key)
    if odd is not None:
        odd(directory, outside)
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}

    # verify first: it changes nothing, and the broker's start finishes what a crash left.
    verify = _verify(directory, public, capsys, "--log-name", "audit.log")
    inferred = _verify(directory, public, capsys)
    broker = _broker(log_path, key, caplog)

    assert (broker.split()[0], verify.split()[0]) == (expected, expected), (broker, verify)
    assert named in broker and named in verify, (broker, verify)
    assert NOTED.get(case, "") in verify, verify
    if case in IGNORED:  # named in a note, as not read
        assert IGNORED[case] in verify.partition("left out, not of audit.log: ")[2], verify
        assert inferred.startswith("ambiguous ") and IGNORED[case].split(".")[0] in inferred
    else:
        assert inferred == verify
    if expected != "intact":  # a start refused or warned changed nothing it judged
        after = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        assert {n: after.get(n) for n in before if n.startswith("audit.log.")} == {
            n: b for n, b in before.items() if n.startswith("audit.log.")
        }


@pytest.mark.parametrize(
    ("names", "files", "shipping", "odd"),
    [
        (["audit.log.0-2", "audit.log.0-2.head", "audit.log", "audit.log.head"], 1, (), ()),
        (["audit.log.10-12", "audit.log.3-9.head", "audit.log.3-9"], 2, (), ()),
        (["audit.log.0-2", "audit.log.3-5", "audit.log.3-5.head"], 2, ("audit.log.0-2",), ()),
        (
            ["audit.log.01-2", "audit.log.1-1-1", "audit.log.x-1", "other.0-1"],
            0,
            (),
            ("audit.log.01-2",),
        ),
        (["audit.log.\u0663-\u0665", ".audit.log.0-1", "audit.logs.0-1"], 0, (), ()),
    ],
)
def test_list_sealed_reads_names_as_a_rotation_writes_them(
    names: list[str], files: int, shipping: tuple[str, ...], odd: tuple[str, ...]
) -> None:
    """Only the log's own names count (not another log's, not hidden or non-ASCII digits)."""
    listing = list_sealed(names, "audit.log")
    assert (len(listing.files), listing.shipping, listing.not_canonical) == (files, shipping, odd)
    assert [f.first for f in listing.files] == sorted(f.first for f in listing.files)


@pytest.mark.parametrize("linked", ["log", "head"])
def test_audit_verify_of_one_file_follows_no_link(tmp_path: Path, linked: str) -> None:
    """``audit verify FILE`` followed a link given as FILE, or beside it as its head, wherever it
    pointed (intact: the genuine files were there): a link is now an error naming it, as the
    broker's start says of one (its directories may still be links)."""
    key = load_signing_key(Secret(new_signing_key()[0]))
    real = tmp_path / "elsewhere" / "audit.log"
    real.parent.mkdir()
    with AuditLog.open(real, key) as log:
        log.append(event(0))
    link = tmp_path / "audit.log"
    if linked == "log":
        link.symlink_to(real)
        shutil.copyfile(head_path(real), head_path(link))
    else:
        shutil.copyfile(real, link)
        head_path(link).symlink_to(head_path(real))
    with pytest.raises(AuditUnavailable, match=r"symbolic link.*not followed"):
        verify_audit_log(link, public_key=key.public_key())
    assert verify_audit_log(real, public_key=key.public_key()).intact


@pytest.mark.parametrize(
    ("pair", "expected", "named"),
    [("audit.log.0-2", "intact", "starts at seq 3"), ("audit.log.3-5", "tampered", "seq 3..5")],
)
def test_audit_verify_lists_again_when_a_listed_pair_is_gone_at_its_open(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    pair: str,
    expected: str,
    named: str,
) -> None:
    """A shipper deleting a pair (log and head) after ``audit verify DIR`` listed the directory
    and before it opened the log made it stop, AUDIT_LOG_NOT_FOUND: it now lists the directory
    again, and judges what is there as the broker's start does (the oldest pair gone is
    retention, one from the middle tampering)."""
    private_pem, public_pem = new_signing_key()
    key = load_signing_key(Secret(private_pem))
    public = tmp_path / "audit.pub.pem"
    public.write_bytes(public_pem)
    directory = tmp_path / "audit"
    directory.mkdir()
    _make_series(directory / "audit.log", key)
    real_open = os.open
    deleted: list[str] = []

    def open_while_shipping(path: object, *args: object, **kwargs: object) -> int:
        if str(path) == str(directory / pair) and not deleted:
            for name in (pair, pair + ".head"):
                (directory / name).unlink()
                deleted.append(name)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", open_while_shipping)
    verify = _verify(directory, public, capsys)
    monkeypatch.undo()
    assert deleted == [pair, pair + ".head"]
    broker = _broker(directory / "audit.log", key, caplog)
    assert (broker.split()[0], verify.split()[0]) == (expected, expected), (broker, verify)
    assert named in verify, verify


def test_audit_verify_of_a_file_under_a_looping_directory_says_so(tmp_path: Path) -> None:
    """ELOOP from a directory of the path (a link that loops) was reported as the file being a
    symbolic link not followed: it is now the system's own error, naming the path and the errno
    (it named no errno, unlike every other audit message naming a failed call)."""
    (tmp_path / "loop").symlink_to("loop")
    path = tmp_path / "loop" / "audit.log"
    with pytest.raises(AuditUnavailable) as info:
        verify_audit_log(path)
    assert info.value.message == f"cannot read {path}: Too many levels of symbolic links (ELOOP)"
