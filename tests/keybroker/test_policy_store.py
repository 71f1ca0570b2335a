"""The broker's policy store refuses policies that cannot be right where it runs, and documents
beyond its bounds (issue 11, findings 4 and 7)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from strongroom.attestation.errors import PolicyInvalid
from strongroom.attestation.evidence import TeeType
from strongroom.errors import FailedPrecondition
from strongroom.keybroker import policies as policies_module
from strongroom.keybroker.errors import (
    PolicyChanged,
    PolicyStoreBusy,
    PolicyUnreadable,
    StoredPolicyInvalid,
)
from strongroom.keybroker.policies import LOCK_FILE, RACY_WINDOW_NS, PolicyStore, _stamp
from strongroom.keybroker.policy_bounds import (
    MAX_POLICY_BYTES,
    MAX_POLICY_DEPTH,
    check_policy_bounds,
)
from strongroom.reasons import Reason
from tests.keybroker.helpers import replace_keeping_mtime

DOMAIN = "strongroom.test"
MEASUREMENT = "ab" * 48


def document(*, callers: str = f"spiffe://{DOMAIN}/inference", debug: bool = False) -> str:
    return (
        'version: "1"\n'
        f'allowed_spiffe_ids: ["{callers}"]\n'
        "tee_types: [SEV_SNP]\n"
        "sev_snp:\n"
        f'  measurements: ["{MEASUREMENT}"]\n'
        "  products: [Milan]\n"
        "  min_reported_tcb: {bootloader: 3, tee: 0, snp: 8, microcode: 115}\n"
        f"  allow_debug: {'true' if debug else 'false'}\n"
    )


def store(tmp_path: Path, *, production: bool) -> PolicyStore:
    return PolicyStore(tmp_path / "policies", trust_domain=DOMAIN, production=production)


@pytest.mark.parametrize("production", [True, False])
def test_a_foreign_trust_domain_is_always_refused(tmp_path: Path, production: bool) -> None:
    with pytest.raises(PolicyInvalid) as info:
        store(tmp_path, production=production).put(
            "k1", document(callers="spiffe://evil.example/inference")
        )
    assert info.value.reason == Reason.POLICY_FOREIGN_TRUST_DOMAIN
    assert "spiffe://evil.example/inference" in info.value.message
    assert not (tmp_path / "policies" / "k1.yaml").exists()


def test_allow_debug_is_refused_in_production_only(tmp_path: Path) -> None:
    with pytest.raises(PolicyInvalid) as info:
        store(tmp_path, production=True).put("k1", document(debug=True))
    assert info.value.reason == Reason.POLICY_DEBUG_IN_PRODUCTION
    assert (
        store(tmp_path, production=False)
        .put("k1", document(debug=True))
        .policy.rules[TeeType.SEV_SNP]
    )
    # A debug policy a development broker stored does not load in a production one either: the
    # broker's configuration error (it was INVALID_ARGUMENT, as if whoever asked sent it).
    with pytest.raises(StoredPolicyInvalid) as stored:
        store(tmp_path, production=True).get("k1")
    assert (stored.value.status_name, stored.value.reason) == (
        "FAILED_PRECONDITION",
        Reason.POLICY_DEBUG_IN_PRODUCTION,
    )


SIMULATED_TDX = (
    'version: "1"\n'
    f'allowed_spiffe_ids: ["spiffe://{DOMAIN}/inference"]\n'
    "tee_types: [TDX]\n"
    "tdx:\n"
    f'  mrtds: ["{MEASUREMENT}"]\n'
    "  allow_simulated: true\n"
)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (document() + "  allow_simulated: true\n", "sev_snp.allow_simulated"),
        (SIMULATED_TDX, "tdx.allow_simulated"),
    ],
)
def test_allow_simulated_is_refused_in_production_only(
    tmp_path: Path, text: str, field: str
) -> None:
    """A policy that admits the simulated TEE is development material (the compose stack's
    policies/resnet.yaml): a production broker stored and served it, relying on its trust store
    alone to keep simulated evidence out."""
    with pytest.raises(PolicyInvalid) as info:
        store(tmp_path, production=True).put("k1", text)
    assert info.value.reason == Reason.POLICY_SIMULATED_IN_PRODUCTION
    assert field in info.value.message
    assert store(tmp_path, production=False).put("k1", text).policy.version == "1"
    with pytest.raises(StoredPolicyInvalid) as stored:
        store(tmp_path, production=True).get("k1")
    assert stored.value.reason == Reason.POLICY_SIMULATED_IN_PRODUCTION


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (document() + "  allow_simulated: true\n", Reason.POLICY_SIMULATED_IN_PRODUCTION),
        (SIMULATED_TDX, Reason.POLICY_SIMULATED_IN_PRODUCTION),
        (document(debug=True), Reason.POLICY_DEBUG_IN_PRODUCTION),
    ],
    ids=["snp-simulated", "tdx-simulated", "debug"],
)
def test_a_production_store_without_a_trust_domain_still_refuses_development_policies(
    tmp_path: Path, text: str, reason: str
) -> None:
    """A store built without a trust domain (PolicyStore's default) skipped every deployment
    check: in production it stored and served policies admitting the simulated TEE or debug VMs.
    Only the foreign-trust-domain check needs the domain."""
    policies = PolicyStore(tmp_path / "policies", production=True)
    with pytest.raises(PolicyInvalid) as info:
        policies.put("k1", text)
    assert info.value.reason == reason
    assert not (tmp_path / "policies" / "k1.yaml").exists()
    PolicyStore(tmp_path / "policies", production=False).put("k1", text)
    with pytest.raises(StoredPolicyInvalid) as stored:
        policies.get("k1")
    assert stored.value.reason == reason
    # Without a trust domain, callers in any domain are left to the authoriser.
    assert policies.put("k2", document(callers="spiffe://other.example/inference"))


def test_a_good_policy_is_stored(tmp_path: Path) -> None:
    stored = store(tmp_path, production=True).put("k1", document())
    assert stored.policy.version == "1"


def test_the_issues_nested_document_is_refused_quickly_without_recursion(tmp_path: Path) -> None:
    """Before: RecursionError (INTERNAL) and thousands of log lines."""
    for depth in (50_000, 20_000, MAX_POLICY_DEPTH + 1):
        with pytest.raises(PolicyInvalid) as info:
            store(tmp_path, production=True).put("k1", "[" * depth + "]" * depth)
        assert info.value.reason in (Reason.POLICY_TOO_LARGE, Reason.POLICY_TOO_DEEP)


def test_depth_within_the_bound_is_left_to_the_schema() -> None:
    inner = MAX_POLICY_DEPTH - 1  # the top-level mapping is one level
    check_policy_bounds("a: " + "[" * inner + "]" * inner)
    with pytest.raises(PolicyInvalid) as info:
        check_policy_bounds("not: [valid")
    assert info.value.reason == Reason.POLICY_SYNTAX


def test_size_and_node_bounds() -> None:
    with pytest.raises(PolicyInvalid, match="bytes"):
        check_policy_bounds("#" * (MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyInvalid, match="YAML nodes"):
        check_policy_bounds("[" + ", ".join(["1"] * 5000) + "]")
    with pytest.raises(PolicyInvalid, match="nests deeper"):
        check_policy_bounds("- " * (MAX_POLICY_DEPTH + 1) + "x")


def test_reading_a_policy_interns_no_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12 (broker memory): every release reads its key's policy. A string interned per
    request and then dropped leaves a dead slot in the interpreter's interned table; pathlib
    interns each path part, and the broker's table grew and was rebuilt one size up (+0.9 MB)
    after ~10,000 releases. The cached path of a release must intern nothing."""
    policies = store(tmp_path, production=False)
    (tmp_path / "policies").mkdir()
    policies.put("k1", document())
    policies.get("k1")  # loaded and cached
    interned: list[str] = []
    real = sys.intern

    def counting(text: str) -> str:
        interned.append(text)
        return real(text)

    monkeypatch.setattr(sys, "intern", counting)
    assert policies.get("k1").policy.version == "1"
    assert interned == []


def test_a_policy_replaced_with_the_same_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    """The cache was keyed by (mtime, size): a caller revoked by swapping its ID for another of
    the same length, deployed by a tool that keeps mtimes, kept its keys until a restart."""
    policies = store(tmp_path, production=False)
    stored = policies.put("k1", document())
    assert f"spiffe://{DOMAIN}/inference" in policies.get("k1").policy.allowed_spiffe_ids
    revoked = document(callers=f"spiffe://{DOMAIN}/inferenz2")
    assert len(revoked) == len(stored.document)
    path = tmp_path / "policies" / "k1.yaml"
    replace_keeping_mtime(path, revoked)
    assert policies.get("k1").policy.allowed_spiffe_ids == {f"spiffe://{DOMAIN}/inferenz2"}


def test_a_policy_rewritten_in_place_with_the_same_size_and_mtime_is_read_again(
    tmp_path: Path,
) -> None:
    """Same inode (cp -p onto the file): its ctime changed, which no tool can set back."""
    policies = store(tmp_path, production=False)
    policies.put("k1", document())
    policies.get("k1")
    path = tmp_path / "policies" / "k1.yaml"
    before = os.stat(path)
    time.sleep(0.02)  # past one clock tick, where ctimes are that coarse
    path.write_text(document(callers=f"spiffe://{DOMAIN}/inferenz2"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_ino == before.st_ino
    assert policies.get("k1").policy.allowed_spiffe_ids == {f"spiffe://{DOMAIN}/inferenz2"}


def _as_if_unchanged(policies: PolicyStore, path: Path) -> None:
    """Makes the cached entry's stamp the file's current one: what a rewrite within the kernel's
    clock tick (same inode, size and times) leaves, which a test cannot make the kernel do."""
    cached = policies._cache["k1"]
    policies._cache["k1"] = (_stamp(os.stat(path)), *cached[1:])  # type: ignore[assignment]


def test_a_policy_rewritten_within_the_clock_tick_of_its_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache knew a file by its stamp alone: one rewritten (or replaced on a reused inode, at
    the same size) within the tick of the kernel's coarse clock in which it was read kept every
    time, and releases were judged by the replaced policy until the file next changed."""
    path = tmp_path / "policies" / "k1.yaml"
    now = [0]
    policies = PolicyStore(
        tmp_path / "policies", trust_domain=DOMAIN, production=False, clock=lambda: now[0]
    )
    policies.put("k1", document())
    now[0] = os.stat(path).st_ctime_ns  # read in the tick it was written in
    assert policies.get("k1").policy.allowed_spiffe_ids == {f"spiffe://{DOMAIN}/inference"}
    path.write_text(document(callers=f"spiffe://{DOMAIN}/inferenz2"))  # same size, same inode
    _as_if_unchanged(policies, path)
    assert policies.get("k1").policy.allowed_spiffe_ids == {f"spiffe://{DOMAIN}/inferenz2"}
    # Read once well after its change, the file is known by its stamp again: no read per use.
    now[0] = os.stat(path).st_ctime_ns + RACY_WINDOW_NS
    policies.get("k1")
    reads: list[str] = []

    def reading(path: str, directory: str, key_id: str) -> str:
        reads.append(path)
        return ""

    monkeypatch.setattr(policies_module, "read_policy_text", reading)
    policies.get("k1")
    assert reads == []


def test_a_policy_that_does_not_load_is_parsed_once_until_its_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored policy that did not load was read and parsed again by every call naming its key,
    before the caller was checked: any holder of an inference certificate chose how often the
    broker parsed YAML. It is parsed once per version of the file now (the same racy-timestamp
    rule as a policy that loads), each call refused with the same reason and message."""
    path = tmp_path / "policies" / "k1.yaml"
    now = [0]
    policies = PolicyStore(
        tmp_path / "policies", trust_domain=DOMAIN, production=False, clock=lambda: now[0]
    )
    policies.put("k1", document())
    path.write_text(document() + "release_to: [\n")  # a hand edit gone wrong
    now[0] = os.stat(path).st_ctime_ns + RACY_WINDOW_NS  # read well after its change
    reads: list[str] = []
    real = policies_module.read_policy_text

    def reading(path: str, directory: str, key_id: str) -> str:
        reads.append(path)
        return real(path, directory, key_id)

    monkeypatch.setattr(policies_module, "read_policy_text", reading)
    refusals = []
    for _ in range(3):
        with pytest.raises(StoredPolicyInvalid) as info:
            policies.get("k1")
        refusals.append((info.value.reason, info.value.message))
    assert len(reads) == 1, reads  # before: one read and parse per call
    assert len(set(refusals)) == 1 and "does not load" in refusals[0][1], refusals
    # Mended, it is read again and loads.
    path.write_text(document(callers=f"spiffe://{DOMAIN}/inferenz2"))
    now[0] = os.stat(path).st_ctime_ns + RACY_WINDOW_NS
    assert policies.get("k1").policy.allowed_spiffe_ids == {f"spiffe://{DOMAIN}/inferenz2"}
    assert len(reads) == 2


@pytest.mark.parametrize("how", ["in place", "renamed over", "symlinked", "not utf-8"])
def test_a_kept_load_failure_never_outlives_a_change_of_its_file(tmp_path: Path, how: str) -> None:
    """A failure kept by its file's stamp (item 118) is the file's until any change: mended in
    place or by a rename with the same size and mtime (a tool keeping times), replaced by a link
    to a good document, or turned unreadable, the next call reads the file again. Passes on the
    code under review: recorded as checked."""
    directory = tmp_path / "policies"
    path = directory / "k1.yaml"
    now = [0]
    policies = PolicyStore(directory, trust_domain=DOMAIN, production=False, clock=lambda: now[0])
    good = document(callers=f"spiffe://{DOMAIN}/inferenz2")
    policies.put("k1", document())
    bad = "[" + good[1:]  # the same size as the good one, and no YAML mapping
    replace_keeping_mtime(path, bad)
    now[0] = os.stat(path).st_ctime_ns + RACY_WINDOW_NS  # the failure's stamp is trusted
    for _ in range(2):
        with pytest.raises(StoredPolicyInvalid):
            policies.get("k1")
    before = os.stat(path)
    time.sleep(0.02)  # past one clock tick, where ctimes are that coarse
    if how == "in place":
        path.write_text(good)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert os.stat(path).st_ino == before.st_ino
    elif how == "renamed over":
        replace_keeping_mtime(path, good)
    elif how == "symlinked":
        (directory / "k1-good.yaml").write_text(good)
        path.unlink()
        path.symlink_to("k1-good.yaml")
    else:
        path.write_bytes(b"\xff" + good[1:].encode())
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    now[0] = max(now[0], os.stat(path).st_ctime_ns + RACY_WINDOW_NS)
    if how == "not utf-8":
        with pytest.raises(PolicyUnreadable):
            policies.get("k1")
        return
    assert policies.get("k1").policy.allowed_spiffe_ids == {f"spiffe://{DOMAIN}/inferenz2"}


@pytest.mark.parametrize(
    "content",
    [
        document().encode() + b'description: "caf\xe9"\n',  # a hand edit saved in Latin-1
        b"\xff\xfe" + document().encode("utf-16-le"),  # ... or in UTF-16 by a Windows editor
    ],
    ids=["latin-1", "utf-16"],
)
def test_a_policy_file_that_is_not_utf8_is_unreadable_and_has_no_version(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a bare UnicodeDecodeError, so INTERNAL for a release, and PolicyStore.version
    raised it too: ListKeys failed for every key."""
    policies = store(tmp_path, production=False)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "k1.yaml").write_bytes(content)
    with pytest.raises(PolicyUnreadable) as info:
        policies.get("k1")
    assert (info.value.status_name, info.value.reason) == (
        "FAILED_PRECONDITION",
        "POLICY_UNREADABLE",
    )
    assert "UTF-8" in info.value.message
    assert policies.version("k1") == ""
    assert [r.reason for r in caplog.records] == ["POLICY_UNREADABLE"]  # type: ignore[attr-defined]


def test_a_policy_path_that_cannot_be_stat_ed_is_unreadable_and_has_no_version(
    tmp_path: Path,
) -> None:
    """Only FileNotFoundError was caught around os.stat: EACCES (a directory the broker cannot
    search), ELOOP, ENOTDIR or EIO escaped as a bare OSError. ELOOP stands in for them here (the
    tests may run as root, who is never refused EACCES)."""
    (tmp_path / "policies").mkdir()
    link = tmp_path / "policies" / "k1.yaml"
    link.symlink_to(link)
    policies = store(tmp_path, production=False)
    with pytest.raises(PolicyUnreadable) as info:
        policies.get("k1")
    assert info.value.reason == "POLICY_UNREADABLE"
    assert str(tmp_path) not in info.value.message  # the problem, not where the files are
    assert policies.version("k1") == ""


def test_a_key_without_a_policy_file_has_no_version(tmp_path: Path) -> None:
    assert store(tmp_path, production=False).version("k1") == ""


# --- compare-and-swap and the policy directory's change lock, across processes ---------------

_ROOT = Path(__file__).resolve().parents[2]


class _Racer:
    """Another broker process over the same policy directory (tests/keybroker/policy_racer.py)."""

    def __init__(self, directory: Path, template: Path, *, wrapper: Sequence[str] = ()) -> None:
        self.process = subprocess.Popen(
            [
                *wrapper,
                sys.executable,
                "-m",
                "tests.keybroker.policy_racer",
                str(directory),
                str(template),
            ],
            cwd=_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def answer(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0


def _template(tmp_path: Path) -> Path:
    """The racers' policy template: :func:`document` at version ``"VERSION"``."""
    template = tmp_path / "template.yaml"
    template.write_text(document().replace('"1"', '"VERSION"'), encoding="utf-8")
    return template


@pytest.fixture
def racers(tmp_path: Path) -> Iterator[tuple[Path, list[_Racer]]]:
    """Two processes over ``tmp_path/policies``; the template's version is ``"VERSION"``."""
    template = _template(tmp_path)
    directory = tmp_path / "policies"
    started = [_Racer(directory, template) for _ in range(2)]
    yield directory, started
    for racer in started:
        racer.close()


def test_a_compare_and_swap_replaces_only_the_version_it_expects(tmp_path: Path) -> None:
    policies = store(tmp_path, production=True)
    first = policies.check("k1", document())
    with pytest.raises(PolicyChanged) as raised:
        policies.write("k1", first, expected_version="0")
    assert raised.value.live_version is None and "has none" in raised.value.message
    policies.write("k1", first, expected_version="")  # "no policy yet"
    second = policies.check("k1", document().replace('"1"', '"2"'))
    for stale in ("", "0"):
        with pytest.raises(PolicyChanged) as raised:
            policies.write("k1", second, expected_version=stale)
        assert raised.value.reason == Reason.POLICY_CHANGED
        assert raised.value.live_version == "1" and "at version '1'" in raised.value.message
    assert policies.get("k1").document == document()  # nothing stored
    policies.write("k1", second, expected_version="1")
    assert policies.get("k1").policy.version == "2"


def test_a_compare_and_swap_over_a_policy_that_does_not_load_is_refused(tmp_path: Path) -> None:
    """It has no version to compare: refused, naming the loader's reason; a change without an
    expected version (the fix) still replaces it."""
    policies = store(tmp_path, production=True)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "k1.yaml").write_text("version: [", encoding="utf-8")
    fixed = policies.check("k1", document())
    with pytest.raises(PolicyChanged) as raised:
        policies.write("k1", fixed, expected_version="1")
    assert "does not read or load (POLICY_SYNTAX)" in raised.value.message
    assert "expected at version '1'" in raised.value.message
    policies.write("k1", fixed)
    assert policies.get("k1").policy.version == "1"


def test_a_change_waits_for_another_process_holding_the_directory_lock(
    racers: tuple[Path, list[_Racer]],
) -> None:
    """The lock is the directory's, across processes: while another broker process checks and
    writes, a change here neither checks nor writes (it read the version the other was about to
    replace, and both changes were made, the last one silently winning)."""
    directory, (other, _) = racers
    policies = PolicyStore(directory, trust_domain=DOMAIN, production=True)
    policies.write("k1", policies.check("k1", document()))
    other.send("hold")
    assert other.answer() == "held"
    mine = policies.check("k1", document().replace('"1"', '"mine"'))
    with pytest.raises(PolicyStoreBusy) as raised:
        policies.write("k1", mine, expected_version="1", lock_wait=0)
    assert raised.value.reason == Reason.POLICY_STORE_BUSY
    assert "nothing was stored" in raised.value.message
    other.send("release")
    assert other.answer() == "released"
    assert policies.get("k1").policy.version == "1"
    policies.write("k1", mine, expected_version="1", lock_wait=0)  # free again
    assert policies.get("k1").policy.version == "mine"


def test_two_processes_expecting_one_version_never_both_replace_it(
    racers: tuple[Path, list[_Racer]],
) -> None:
    """Each round, two broker processes replace the live version at once: exactly one change is
    made, the other refused POLICY_CHANGED, and the live policy is the one that was."""
    directory, pair = racers
    policies = PolicyStore(directory, trust_domain=DOMAIN, production=True)
    live = "-"
    for round_ in range(25):
        for name, racer in zip("ab", pair, strict=True):
            racer.send(f"set {live} r{round_}-{name}")
        answers = [racer.answer() for racer in pair]
        assert sorted(answers) == ["POLICY_CHANGED", "ok"], answers
        live = policies.get("k1").policy.version
        assert live == f"r{round_}-{'ab'[answers.index('ok')]}"


@pytest.mark.parametrize("planted", ["symlink", "dangling symlink", "directory", "fifo"])
def test_a_lock_file_planted_as_a_link_or_special_file_is_refused_and_never_followed(
    tmp_path: Path, planted: str
) -> None:
    """Whoever can write the policy directory could plant .policy-changes.lock as a symlink: the
    broker opened its target for writing (created it, when dangling) wherever it was, another
    service's directory or a device that acts when opened. Refused now, nothing stored or made."""
    policies = store(tmp_path, production=True)
    policies.put("k1", document())
    lock = tmp_path / "policies" / LOCK_FILE
    lock.unlink()  # the broker's own, replaced by the planted one
    target = tmp_path / "elsewhere"
    if planted == "symlink":
        target.write_bytes(b"someone else's\n")
        lock.symlink_to(target)
    elif planted == "dangling symlink":
        lock.symlink_to(target)
    elif planted == "directory":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    new = policies.check("k1", document().replace('"1"', '"2"'))
    with pytest.raises(FailedPrecondition) as raised:
        policies.write("k1", new, expected_version="1")
    assert raised.value.reason == Reason.POLICY_STORE_READ_ONLY
    assert (
        "not a regular file" in raised.value.message
        and "nothing was stored" in raised.value.message
    )
    assert policies.get("k1").policy.version == "1"
    if planted == "symlink":
        assert target.read_bytes() == b"someone else's\n"
    elif planted == "dangling symlink":
        assert not target.exists()
    lock.unlink() if planted != "directory" else lock.rmdir()
    policies.write("k1", new, expected_version="1")  # the broker makes its own again
    assert stat.S_ISREG(os.lstat(lock).st_mode)


def test_two_paths_to_one_directory_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    """The lock was a POSIX record lock, which a process holds once whatever descriptor took it,
    and this process's threads took turns per directory *path* (its realpath): through two bind
    mounts of one directory (two volumes of one pod naming one share) one broker process made two
    changes at once, each compare-and-swap seeing the version the other was replacing. The lock
    is now the open file's (``F_OFD_SETLK``): two opens exclude each other in one process too.
    The second path is a bind mount in a user and mount namespace of the racer's own."""
    probe = subprocess.run(["unshare", "-Urm", "true"], check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unprivileged user and mount namespaces are not available (unshare -Urm)")
    directory, alias = tmp_path / "policies", tmp_path / "alias"
    alias.mkdir()
    policies = PolicyStore(directory, trust_domain=DOMAIN, production=True)
    policies.write("k1", policies.check("k1", document()))
    mounted = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    racer = _Racer(
        directory,
        _template(tmp_path),
        wrapper=["unshare", "-Urm", "sh", "-c", mounted, "sh", str(directory), str(alias)],
    )
    try:
        racer.send(f"hold {alias}")
        assert racer.answer() == "held"
        racer.send("set 1 mine 0")  # the same process, through the directory's other path
        assert racer.answer() == "POLICY_STORE_BUSY"
        assert policies.get("k1").policy.version == "1"
        racer.send("release")
        assert racer.answer() == "released"
        racer.send("set 1 mine 0")
        assert racer.answer() == "ok"
    finally:
        racer.close()
    assert policies.get("k1").policy.version == "mine"


def test_a_change_waiting_on_a_deleted_lock_file_then_waits_for_the_file_made_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change waiting for the lock of a file that was deleted meanwhile (and made again by
    another change, which holds the new one) got the old file's lock once its holder let it go,
    and wrote beside the holder of the new one. It now checks that the file it locked is still
    the one at the path, and waits for the lock of the one there."""
    directory = tmp_path / "policies"
    policies = PolicyStore(directory, trust_domain=DOMAIN, production=True)
    policies.write("k1", policies.check("k1", document()))
    take = PolicyStore._take_lock
    takes: list[int] = []
    waiting = threading.Event()

    def counted(fd: int, *args: Any) -> None:
        takes.append(fd)
        waiting.set()
        take(fd, *args)

    monkeypatch.setattr(policies, "_take_lock", counted)
    mine = policies.check("k1", document().replace('"1"', '"mine"'))
    changer = threading.Thread(target=policies.write, args=("k1", mine), kwargs={"lock_wait": 30})
    other = _Racer(directory, _template(tmp_path))
    third = PolicyStore(directory, trust_domain=DOMAIN, production=True)
    try:
        other.send("hold")
        assert other.answer() == "held"
        changer.start()
        assert waiting.wait(30)  # it opened the held file and waits for its lock
        (directory / LOCK_FILE).unlink()
        with third._changing("k1", 30.0):  # makes the file again, and holds it
            other.send("release")
            assert other.answer() == "released"
            for _ in range(1500):  # until it waits again, or (as it did) writes beside us
                if len(takes) > 1 or policies.live("k1").policy.version != "1":  # type: ignore[union-attr]
                    break
                time.sleep(0.02)
            assert policies.get("k1").policy.version == "1"
            assert len(takes) == 2
    finally:
        other.close()
        changer.join(30)
    assert policies.get("k1").policy.version == "mine"


@pytest.mark.parametrize("attribute_cache", [False, True], ids=["local", "nfs-attribute-cache"])
def test_a_lock_file_deleted_while_a_change_holds_it_does_not_let_two_changes_both_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attribute_cache: bool
) -> None:
    """A sync tool pruning unknown files (rsync --delete, a GitOps sync) deleted the lock file
    while a change held it: the next change created a new file, locked that one and went ahead,
    and of two changes expecting version 1 both were written, the later silently replacing the
    other. The holder now checks, just before its write, that the file it locked is still the one
    at the path; it was not, so it takes the lock again and checks the live policy again: one
    change is made, the other refused POLICY_CHANGED.

    Over NFS the file is made again by another host, and this client's attribute cache answers
    ``lstat``/``stat`` of the path with the deleted file's inode for up to a minute: the check
    asked ``lstat`` and found its own file there. It is emulated as the client answers: every
    ``lstat``/``stat`` of the lock file's path in this process gives the deleted file's."""
    directory = tmp_path / "policies"
    policies = PolicyStore(directory, trust_domain=DOMAIN, production=True)
    policies.write("k1", policies.check("k1", document()))
    if attribute_cache:
        cached = os.lstat(directory / LOCK_FILE)
        lock_path = os.fspath(directory / LOCK_FILE)
        real_lstat, real_stat = os.lstat, os.stat

        def from_cache(real: Any) -> Any:
            def answer(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
                if os.fspath(path) == lock_path:
                    return cached
                return real(path, *args, **kwargs)  # type: ignore[no-any-return]

            return answer

        monkeypatch.setattr(os, "lstat", from_cache(real_lstat))
        monkeypatch.setattr(os, "stat", from_cache(real_stat))

    def prune(held: int, other: _Racer) -> None:
        (directory / LOCK_FILE).unlink()  # pruned while held
        other.send("set 1 theirs 0")
        assert other.answer() == "ok"  # a lock file of its own, which nobody held

    outcome = _change_paused_under_the_lock(tmp_path, directory, policies, monkeypatch, prune)
    assert isinstance(outcome, PolicyChanged), outcome
    assert outcome.live_version == "theirs"
    assert policies.get("k1").policy.version == "theirs"


_UNLOCK = struct.pack("hhqqi4x", fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)


def _lose(held: int) -> None:
    """Drops the lock of ``held`` as an NFSv4 server drops the locks of a client whose lease
    expired (a partition, a stalled client): the holder is not told."""
    fcntl.fcntl(held, fcntl.F_OFD_SETLK, _UNLOCK)


def test_a_change_whose_lock_was_lost_to_another_holder_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock lost with its NFSv4 lease went unnoticed: the change checked only that its lock
    file was still at the path, and wrote while another replica held the lock and was about to
    write its own change, checked against the policy this one replaces. Just before its rename a
    change takes its lock again: refused (another holds it), it writes nothing and waits for the
    lock as any change, here until its wait ends POLICY_STORE_BUSY."""
    directory = tmp_path / "policies"
    policies = PolicyStore(directory, trust_domain=DOMAIN, production=True)
    policies.write("k1", policies.check("k1", document()))

    def lost(held: int, other: _Racer) -> None:
        _lose(held)
        other.send("hold")
        assert other.answer() == "held"  # granted: the lock was this change's no more

    outcome = _change_paused_under_the_lock(
        tmp_path, directory, policies, monkeypatch, lost, lock_wait=0.5
    )
    assert isinstance(outcome, PolicyStoreBusy), outcome
    assert policies.get("k1").policy.version == "1"


def test_a_change_whose_lock_was_lost_and_free_again_checks_the_live_policy_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock lost with its lease, another replica's change made under it meanwhile and the lock
    free again: taking it again succeeds, and cannot tell. The live policy the change was checked
    against is read again once the lock is taken again: it changed, so the change is checked
    again, and its compare-and-swap refused POLICY_CHANGED (both changes were made before)."""
    directory = tmp_path / "policies"
    policies = PolicyStore(directory, trust_domain=DOMAIN, production=True)
    policies.write("k1", policies.check("k1", document()))

    def lost(held: int, other: _Racer) -> None:
        _lose(held)
        other.send("set 1 theirs 0")
        assert other.answer() == "ok"

    outcome = _change_paused_under_the_lock(tmp_path, directory, policies, monkeypatch, lost)
    assert isinstance(outcome, PolicyChanged), outcome
    assert outcome.live_version == "theirs"
    assert policies.get("k1").policy.version == "theirs"


def _change_paused_under_the_lock(
    tmp_path: Path,
    directory: Path,
    policies: PolicyStore,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[int, _Racer], None],
    *,
    lock_wait: float = 10.0,
) -> BaseException | None:
    """The outcome of a change of ``k1`` from version 1 to "mine" that, holding the lock and
    having checked the live policy, waits for ``meanwhile`` (given the descriptor whose lock it
    holds and another broker process over ``directory``, the store's) before it writes."""
    inside, go = threading.Event(), threading.Event()
    checked, take = policies.refuse_conflict, PolicyStore._take_lock
    held: list[int] = []

    def pausing(*args: Any, **kwargs: Any) -> Any:
        live = checked(*args, **kwargs)
        if not inside.is_set():  # the first check only: held, checked, about to write
            inside.set()
            go.wait(30)
        return live

    def taking(fd: int, *args: Any) -> None:
        take(fd, *args)
        held.append(fd)

    monkeypatch.setattr(policies, "refuse_conflict", pausing)
    monkeypatch.setattr(policies, "_take_lock", taking)
    outcome: list[BaseException | None] = []

    def mine() -> None:
        try:
            policies.write(
                "k1",
                policies.check("k1", document().replace('"1"', '"mine"')),
                expected_version="1",
                lock_wait=lock_wait,
            )
        except BaseException as exc:  # the caller's assertions read it
            outcome.append(exc)
        else:
            outcome.append(None)

    changer = threading.Thread(target=mine)
    changer.start()
    other = _Racer(directory, _template(tmp_path))
    try:
        assert inside.wait(30)
        meanwhile(held[-1], other)
    finally:
        go.set()
        changer.join(30)
        other.close()
    return outcome[0]


def test_a_lock_file_the_broker_cannot_open_is_named_not_taken_for_a_read_only_directory(
    tmp_path: Path,
) -> None:
    """A lock file the broker's user may not open (another user's, its mode changed) was
    answered as a read-only directory "managed by deployment configuration", which sent the
    operator to the wrong place. Its own message names the file and what it needs; nothing is
    stored. As root the racer runs without the capabilities that bypass file modes."""
    wrapper: list[str] = []
    if os.geteuid() == 0:
        wrapper = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
        if subprocess.run([*wrapper, "true"], check=False, capture_output=True).returncode != 0:
            pytest.skip("cannot drop root's file-mode override (setpriv)")
    directory = tmp_path / "policies"
    store(tmp_path, production=True).put("k1", document())
    (directory / LOCK_FILE).chmod(0)
    other = _Racer(directory, _template(tmp_path), wrapper=wrapper)
    try:
        other.send("why 1 2 0")
        reason, message = other.answer().split(" ", 1)
        # Without the file, in a directory it may not write: that one is read-only, as before.
        (directory / LOCK_FILE).unlink()
        directory.chmod(0o500)
        other.send("why 1 2 0")
        unwritable = other.answer()
    finally:
        directory.chmod(0o700)
        other.close()
    assert reason == Reason.POLICY_STORE_READ_ONLY
    assert f"lock file {LOCK_FILE} cannot be opened (Permission denied)" in message
    assert "read-only" not in message and "nothing was stored" in message
    assert unwritable.startswith("POLICY_STORE_READ_ONLY ") and "read-only" in unwritable
    assert store(tmp_path, production=True).get("k1").policy.version == "1"


def _open_fds(directory: Path) -> list[str]:
    """What this process's descriptors into ``directory`` name (a deleted file's name ends
    " (deleted)"). Only those: the process's whole count also moved with whatever threads an
    earlier test left behind opened or closed meanwhile, and an exact count failed on it."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since it was listed
            name = os.readlink(f"/proc/self/fd/{fd}")
            if name.startswith(f"{directory}/") or name == str(directory):
                names.append(name)
    return sorted(names)


def test_a_lock_file_deleted_on_an_nfs_server_while_waited_for_is_not_a_leaked_locked_fd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over NFS, a file another client deleted answers ``fstat`` with ESTALE. A change that had
    opened the lock file and waited for its lock, the file deleted meanwhile (the sync tooling of
    the finding before), took the deleted file's lock and then asked whether it was still the one
    at the path: the ESTALE escaped the store as a bare OSError (INTERNAL, no DENIED record after
    the change's ALLOWED one) and its descriptor, lock held, was never closed. A file that cannot
    be looked at is not the one at the path: the change locks the file there now and is made.
    ESTALE is emulated here as NFS gives it: for the deleted lock file."""
    directory = tmp_path / "policies"
    policies = PolicyStore(directory, trust_domain=DOMAIN, production=True)
    policies.write("k1", policies.check("k1", document()))
    deleted = os.stat(directory / LOCK_FILE)
    real_fstat = os.fstat

    def nfs_fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if (st.st_dev, st.st_ino, st.st_nlink) == (deleted.st_dev, deleted.st_ino, 0):
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return st

    monkeypatch.setattr(os, "fstat", nfs_fstat)
    take = PolicyStore._take_lock
    waiting = threading.Event()

    def signalled(fd: int, *args: Any) -> None:
        waiting.set()
        take(fd, *args)

    monkeypatch.setattr(policies, "_take_lock", signalled)
    outcome: list[BaseException | None] = []

    def mine() -> None:
        try:
            policies.write(
                "k1", policies.check("k1", document().replace('"1"', '"mine"')), lock_wait=30
            )
        except BaseException as exc:  # the assertions below read it
            outcome.append(exc)
        else:
            outcome.append(None)

    before = _open_fds(directory)
    holder = PolicyStore(directory, trust_domain=DOMAIN, production=True)
    changer = threading.Thread(target=mine)
    with holder._changing("k1", 30.0):
        changer.start()
        assert waiting.wait(30)  # it opened the held file and waits for its lock
        (directory / LOCK_FILE).unlink()
        os.close(os.open(directory / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600))  # made again
    changer.join(30)
    assert outcome == [None], outcome
    assert policies.get("k1").policy.version == "mine"
    assert _open_fds(directory) == before  # every descriptor it opened was closed


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.ENOLCK])
def test_a_lock_the_kernel_refuses_fails_closed_naming_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    """Where the kernel refuses the lock, nothing is stored: EINVAL is a kernel without
    open-file-description locks (before Linux 3.15, or a file system that does not take them),
    ENOLCK a file system whose lock service failed (NFSv3 without lockd). The message still
    asked for "POSIX record locks (fcntl)", which an older broker took and which such a kernel
    offers: an operator checked the file system that had them. It names OFD locks and, for
    EINVAL, the kernel. The refusal is emulated as the kernel answers it: for F_OFD_SETLK."""
    policies = store(tmp_path, production=True)
    policies.write("k1", policies.check("k1", document()))
    real_fcntl = policies_module.fcntl.fcntl

    def refusing(fd: int, command: int, arg: Any = 0) -> Any:
        if command == policies_module.fcntl.F_OFD_SETLK:
            raise OSError(refusal, os.strerror(refusal))
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(policies_module.fcntl, "fcntl", refusing)
    with pytest.raises(FailedPrecondition) as raised:
        policies.write("k1", policies.check("k1", document().replace('"1"', '"2"')))
    monkeypatch.undo()
    assert raised.value.reason == Reason.POLICY_STORE_READ_ONLY
    message = raised.value.message
    assert (
        "open-file-description locks (F_OFD_SETLK)" in message and "nothing was stored" in message
    )
    assert ("Linux 3.15" in message) == (refusal == errno.EINVAL)
    assert policies.get("k1").policy.version == "1"


_OLDER_BROKER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    print("busy", flush=True)
    sys.exit(0)
print("held", flush=True)
sys.stdin.readline()
"""
"""An older broker's change lock: a classic POSIX record lock (``lockf``) on the lock file."""


def test_the_lock_and_an_older_brokers_lockf_exclude_each_other_both_ways(
    tmp_path: Path,
) -> None:
    """During a rolling upgrade older brokers take ``lockf`` locks on the same file: the OFD lock
    must be refused while one is held, and an older broker's refused while a change holds it."""
    policies = store(tmp_path, production=True)
    policies.write("k1", policies.check("k1", document()))
    lock = tmp_path / "policies" / LOCK_FILE
    older = subprocess.Popen(
        [sys.executable, "-c", _OLDER_BROKER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert older.stdin is not None and older.stdout is not None
    try:
        assert older.stdout.readline().strip() == "held"
        with pytest.raises(PolicyStoreBusy):
            policies.write(
                "k1", policies.check("k1", document().replace('"1"', '"2"')), lock_wait=0
            )
    finally:
        older.stdin.close()
        assert older.wait(60) == 0
    with policies._changing("k1", 30.0):
        tried = subprocess.run(
            [sys.executable, "-c", _OLDER_BROKER, str(lock)],
            input="",
            capture_output=True,
            text=True,
            check=True,
        )
    assert tried.stdout.strip() == "busy"
    assert policies.get("k1").policy.version == "1"
