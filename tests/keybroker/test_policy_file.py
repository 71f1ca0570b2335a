"""What the broker reads as a key's policy file: a regular file in the policy directory, bounded;
symlinks within the directory (a Kubernetes ConfigMap's) followed, none leading out of it."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from strongroom.errors import StrongroomError
from strongroom.keybroker.errors import PolicyUnreadable, StoredPolicyInvalid
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.policy_bounds import MAX_POLICY_BYTES
from strongroom.keybroker.policy_file import read_policy_text
from strongroom.keybroker.policy_path import MAX_NAMES
from strongroom.reasons import Reason
from tests.keybroker.test_policy_store import DOMAIN, document

NO_POLICY = "no release policy"


def _store(directory: Path) -> PolicyStore:
    return PolicyStore(directory, trust_domain=DOMAIN, production=True)


def _configmap(directory: Path, stamp: str, files: dict[str, str]) -> None:
    """Lays ``files`` out as the kubelet mounts a ConfigMap, or updates them as it does: a
    timestamped directory, ``..data`` renamed over to point at it, each file a link through
    ``..data``, the previous timestamped directory removed."""
    directory.mkdir(exist_ok=True)
    previous = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    (directory / stamp).mkdir()
    for name, text in files.items():
        (directory / stamp / name).write_text(text, encoding="utf-8")
    (directory / "..data_tmp").symlink_to(stamp)
    os.rename(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    if previous is not None:
        for name in os.listdir(directory / previous):
            os.unlink(directory / previous / name)
        os.rmdir(directory / previous)


def test_a_configmap_mounted_policy_directory_is_read_through_its_links_and_its_updates(
    tmp_path: Path,
) -> None:
    """The Helm chart's policy store is a ConfigMap mount, every policy a link through ``..data``:
    refusing symlinks outright would refuse every policy there. Links within the directory are
    followed, a ConfigMap update (``..data`` swapped, the previous directory removed) included."""
    directory = tmp_path / "policies"
    _configmap(directory, "..2026_12_06_22_00_00.1", {"k1.yaml": document()})
    policies = _store(directory)
    assert policies.get("k1").policy.version == "1"
    assert policies.live("k1") is not None
    _configmap(directory, "..2026_12_06_22_05_00.2", {"k1.yaml": document().replace('"1"', '"2"')})
    assert policies.get("k1").policy.version == "2"
    live = policies.live("k1")
    assert live is not None and live.policy.version == "2"


@pytest.mark.parametrize("through", ["file link", "..data link"])
def test_a_policy_linked_to_a_file_outside_the_directory_is_not_read(
    tmp_path: Path, through: str
) -> None:
    """A link leading out of the policy directory was followed: whoever could write the directory
    could point a key's policy at the broker's PIN file or signing key, whose text then reached
    the load error ``keys get-policy`` answers and the broker logs. Such a policy is unreadable
    (POLICY_UNREADABLE, nothing of the file in the message), and setting the key's policy
    replaces the link, not the file it pointed at."""
    secret = tmp_path / "hsm-pin"
    secret.write_text("s3cr3t-pin: [", encoding="utf-8")
    directory = tmp_path / "policies"
    directory.mkdir()
    if through == "file link":
        (directory / "k1.yaml").symlink_to(secret)
    else:  # a ConfigMap-like layout whose ..data leads out
        (directory / "..data").symlink_to(tmp_path)
        (directory / "k1.yaml").symlink_to("..data/hsm-pin")
    policies = _store(directory)
    with pytest.raises(PolicyUnreadable) as raised:
        policies.get("k1", judge=False)
    assert raised.value.reason == Reason.POLICY_UNREADABLE
    assert "outside the policy directory" in raised.value.message
    assert "s3cr3t" not in raised.value.message and str(tmp_path) not in raised.value.message
    assert policies.version("k1") == ""
    policies.put("k1", document())
    assert policies.get("k1").policy.version == "1"
    assert not (directory / "k1.yaml").is_symlink()
    assert secret.read_text(encoding="utf-8") == "s3cr3t-pin: ["


def test_a_fifo_in_place_of_a_policy_is_refused_without_waiting_for_a_writer(
    tmp_path: Path,
) -> None:
    """A FIFO put where a policy belongs hung every request that read the key's policy (the open
    waited for a writer) and every change of it. It is refused, not opened."""
    directory = tmp_path / "policies"
    directory.mkdir()
    fifo = directory / "k1.yaml"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            _store(directory).get("k1", judge=False)
        except BaseException as exc:  # the assertions below read it
            outcome.append(exc)
        else:
            outcome.append(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():  # hung in the open: a writer's open lets it go, then fail the test
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(30)
        pytest.fail("reading a FIFO as a policy waited for a writer")
    assert isinstance(outcome[0], PolicyUnreadable), outcome
    assert "not a regular file" in outcome[0].message


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and its kin so far (/proc/self/io rchar)."""
    for line in Path("/proc/self/io").read_text(encoding="ascii").splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_policy_file_past_the_size_bound_is_refused_unread(tmp_path: Path) -> None:
    """A policy file was read whole before its size was checked: a large (or sparse) file put in
    the directory was read into memory at every use. It is refused POLICY_TOO_LARGE having read
    at most the bound and a byte of it (here nothing: its size tells)."""
    directory = tmp_path / "policies"
    directory.mkdir()
    with open(directory / "k1.yaml", "wb") as file:
        file.write(document().encode())
        file.truncate(64 * 1024 * 1024)  # sparse: no disk, but 64 MiB to read
    policies = _store(directory)
    before = _bytes_read()
    with pytest.raises(StoredPolicyInvalid) as raised:
        policies.get("k1", judge=False)
    read = _bytes_read() - before
    assert read <= 4 * MAX_POLICY_BYTES, read  # the bound, and what else the process read
    assert raised.value.reason == Reason.POLICY_TOO_LARGE
    assert f"larger than {MAX_POLICY_BYTES} bytes" in raised.value.message


def test_a_policy_that_is_a_hard_link_is_not_read(tmp_path: Path) -> None:
    """Only symbolic links were judged: a hard link is the directory's own entry, so whoever could
    write the directory and reach a file of the broker's on the same file system (over NFS the
    server makes the link, past the client's protected_hardlinks; or where that sysctl is off)
    could make ``<key>.yaml`` the broker's PIN file or a secret configuration, whose key names a
    load error then listed. A policy file with another name anywhere is POLICY_UNREADABLE, and
    setting the key's policy replaces the link, leaving the other file as it was."""
    secret = tmp_path / "broker-secrets.yaml"
    secret.write_text("password: hunter2\n", encoding="utf-8")
    directory = tmp_path / "policies"
    directory.mkdir()
    os.link(secret, directory / "k1.yaml")
    (directory / "k2.yaml").symlink_to("k1.yaml")  # a link within the directory, to the same
    policies = _store(directory)
    for key_id in ("k1", "k2"):
        with pytest.raises(PolicyUnreadable) as raised:
            policies.get(key_id, judge=False)
        assert raised.value.reason == Reason.POLICY_UNREADABLE
        assert "hard link" in raised.value.message
        assert "password" not in raised.value.message and "hunter2" not in raised.value.message
    with pytest.raises(PolicyUnreadable):
        policies.live("k1")  # what a change is checked against: refused alike
    policies.put("k1", document())
    assert policies.get("k1").policy.version == "1"
    assert secret.read_text(encoding="utf-8") == "password: hunter2\n"
    assert secret.stat().st_nlink == 1


@pytest.mark.parametrize(
    ("target", "read"),
    [
        ("k0.yaml", True),  # relative, within
        ("{linked}/k0.yaml", True),  # absolute, through policies_dir's own link
        ("{real}/k0.yaml", True),  # absolute, through the directory's real path
        ("../policies-real/k0.yaml", True),  # out by "..", and back in
        ("../policies-real-2/k0.yaml", False),  # a sibling whose name the directory's begins
        ("../policies-real/../secret.yaml", False),  # ".." out for good
    ],
)
def test_links_are_judged_by_where_they_lead_not_how_they_are_spelt(
    tmp_path: Path, target: str, read: bool
) -> None:
    """``policies_dir`` may itself be a link (an operator's, a volume's), links may be absolute or
    relative and hold ``..``: a link is followed when the file it leads to lies in the
    directory's real path, as ``/proc/self/fd`` names it, and not when it lies beside it, in a
    directory whose name merely begins the same."""
    real = tmp_path / "policies-real"
    real.mkdir()
    (real / "k0.yaml").write_text(document(), encoding="utf-8")
    sibling = tmp_path / "policies-real-2"
    sibling.mkdir()
    (sibling / "k0.yaml").write_text(document(), encoding="utf-8")
    (tmp_path / "secret.yaml").write_text(document(), encoding="utf-8")
    linked = tmp_path / "policies"
    linked.symlink_to(real)
    (real / "k1.yaml").symlink_to(target.format(linked=linked, real=real))
    policies = _store(linked)
    if read:
        assert policies.get("k1", judge=False).policy.version == "1"
    else:
        with pytest.raises(PolicyUnreadable) as raised:
            policies.get("k1", judge=False)
        assert "outside the policy directory" in raised.value.message


def _relink(name: Path, target: str | Path) -> None:
    """Points the link ``name`` at ``target`` as an attacker would, atomically (a rename over)."""
    fresh = name.with_name(".swap")
    fresh.symlink_to(target)
    os.rename(fresh, name)


def _fifo_over(name: Path) -> None:
    fresh = name.with_name(".swap")
    os.mkfifo(fresh)
    os.rename(fresh, name)


# What is swapped in for k1.yaml, and which file the swap makes it name.
_SWAPS: dict[str, tuple[Callable[[Path, Path], None], Callable[[Path, Path], Path]]] = {
    "a link to a device": (lambda d, t: _relink(d / "k1.yaml", "/dev/zero"), lambda d, t: Path("/dev/zero")),
    "a link to a FIFO inside": (lambda d, t: _relink(d / "k1.yaml", "pipe"), lambda d, t: d / "pipe"),
    "a link to a file outside": (lambda d, t: _relink(d / "k1.yaml", t / "secret.yaml"), lambda d, t: t / "secret.yaml"),
    "a FIFO in its place": (lambda d, t: _fifo_over(d / "k1.yaml"), lambda d, t: d / "k1.yaml"),
}  # fmt: skip


def _lay_out(case: Path, layout: str) -> Path:
    """A policy directory in ``case`` holding k1's policy as ``layout`` says, a FIFO ``pipe``
    beside it, and ``secret.yaml`` beside the directory."""
    case.mkdir()
    (case / "secret.yaml").write_text("password: hunter2\n", encoding="utf-8")
    directory = case / "policies"
    if layout == "configmap":
        _configmap(directory, "..2026_12_07_01_00_00.1", {"k1.yaml": document()})
    else:
        directory.mkdir()
        (directory / "k1.yaml").write_text(document(), encoding="utf-8")
    os.mkfifo(directory / "pipe")
    return directory


@pytest.mark.parametrize("proc", ["/proc", "no /proc"])
@pytest.mark.parametrize("layout", ["file", "configmap"])
@pytest.mark.parametrize("swap", sorted(_SWAPS))
def test_a_policy_swapped_between_its_check_and_its_read_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str, layout: str, proc: str
) -> None:
    """The file was judged by ``stat`` and then opened by name: a ``<key>.yaml`` swapped in
    between (a link to ``/dev/zero``, to a FIFO, to a file outside the directory; a FIFO itself)
    was opened all the same, a device's open able to act. The swap is made before each of the
    read's opens in turn: the policy read is the file judged or nothing, the swapped-in file is
    never read, and (with /proc, through which the judged file is reopened) never opened but as
    a path (``O_PATH``, which opens nothing)."""
    real_open, real_read, real_readlink = os.open, os.read, os.readlink
    opened: list[tuple[int, tuple[int, int]]] = []  # (flags, (device, inode)) of every open
    read_from: list[tuple[int, int]] = []
    swap_at = [0]  # the open before which to swap (1-based; 0: none), counted down

    def identity(fd: int) -> tuple[int, int]:
        held = os.fstat(fd)
        return held.st_dev, held.st_ino

    def spying_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        swap_at[0] -= 1
        if swap_at[0] == 0:
            _SWAPS[swap][0](directory, case)
        if proc == "no /proc" and str(path).startswith("/proc/"):
            raise FileNotFoundError(2, "No such file or directory")
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        opened.append((flags, identity(fd)))
        return fd

    def spying_read(fd: int, size: int) -> bytes:
        read_from.append(identity(fd))
        return real_read(fd, size)

    def readlink(path: str, *, dir_fd: int | None = None) -> str:
        if proc == "no /proc" and str(path).startswith("/proc/"):
            raise FileNotFoundError(2, "No such file or directory")
        return real_readlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", spying_open)
    monkeypatch.setattr(os, "read", spying_read)
    monkeypatch.setattr(os, "readlink", readlink)
    case = tmp_path / "dry"
    directory = _lay_out(case, layout)
    assert read_policy_text(str(directory / "k1.yaml"), str(directory), "k1") == document()
    opens = len(opened)
    for at in range(1, opens + 1):
        case = tmp_path / f"swap-before-open-{at}"
        directory = _lay_out(case, layout)
        target = _SWAPS[swap][1](directory, case)
        opened.clear()
        read_from.clear()
        swap_at[0] = at
        try:
            text = read_policy_text(str(directory / "k1.yaml"), str(directory), "k1")
        except PolicyUnreadable as exc:
            assert "hunter2" not in exc.message
        else:
            assert text == document(), at
        swapped_in = (target.stat().st_dev, target.stat().st_ino)
        assert swapped_in not in read_from, at
        if proc == "/proc":
            assert all(flags & os.O_PATH for flags, held in opened if held == swapped_in), at


@pytest.mark.parametrize("through", ["file link", "..data link", "absolute ..data link"])
def test_a_link_leading_out_answers_alike_whether_or_not_its_target_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, through: str
) -> None:
    """Whether a policy's link leading out of the directory was refused as leading out or as
    missing (NO_RELEASE_POLICY) depended on whether its target existed, which the broker
    stat'ed: whoever could plant a link learnt from ``keys get-policy`` which files the broker
    could see outside the directory. Such a link is refused alike, existing target or not, and
    nothing outside the directory is looked at."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "exists.yaml").write_text(document(), encoding="utf-8")
    directory = tmp_path / "policies"
    directory.mkdir()
    if through == "file link":
        (directory / "k1.yaml").symlink_to(outside / "exists.yaml")
        (directory / "k2.yaml").symlink_to(outside / "missing.yaml")
    else:
        (directory / "..data").symlink_to(
            outside if through.startswith("absolute") else "../elsewhere"
        )
        (directory / "k1.yaml").symlink_to("..data/exists.yaml")
        (directory / "k2.yaml").symlink_to("..data/missing.yaml")
    hidden = {(f.stat().st_dev, f.stat().st_ino) for f in (outside, outside / "exists.yaml")}
    seen: list[tuple[int, int]] = []

    def spy(call: Callable[..., Any]) -> Callable[..., Any]:
        def spied(*args: Any, **kwargs: Any) -> Any:
            result = call(*args, **kwargs)
            held = os.fstat(result) if isinstance(result, int) else result
            if isinstance(held, os.stat_result):
                seen.append((held.st_dev, held.st_ino))
            return result

        return spied

    for name in ("open", "stat", "lstat", "fstat"):
        monkeypatch.setattr(os, name, spy(getattr(os, name)))
    policies = _store(directory)
    answers = []
    for key_id in ("k1", "k2"):
        for look in (functools.partial(policies.get, judge=False), policies.live):
            with pytest.raises(StrongroomError) as raised:
                look(key_id)  # as keys get-policy asks, and as a change checks
            answer = raised.value
            answers.append((type(answer), answer.reason, answer.message.replace(key_id, "KEY")))
    assert answers[0][0] is PolicyUnreadable and answers[0][1] == Reason.POLICY_UNREADABLE
    assert "outside the policy directory" in answers[0][2]
    assert answers == [answers[0]] * 4
    assert not hidden & set(seen)


@pytest.mark.parametrize(
    ("target", "answer"),
    [
        ("sub/../sub/k0.yaml", "read"),  # down, up and down again, all within
        ("sub/up/sub/k0.yaml", "read"),  # through a link in a subdirectory leading back up
        ("sub", "not a regular file"),  # a directory
        ("sub/k0.yaml/more", "Not a directory"),
        ("missing.yaml", NO_POLICY),  # dangling within: no policy, as a missing file
        ("sub/up/sub/up/../secret.yaml", "outside the policy directory"),
    ],
)
def test_links_within_the_directory_are_resolved_as_the_kernel_would(
    tmp_path: Path, target: str, answer: str
) -> None:
    """Links are resolved by the broker itself, a name at a time, not by the kernel: what it
    finds within the directory (through subdirectories, ``..``, links in them) is what the
    kernel would, and a lookup failing there fails as it did. ``live`` (what a change is
    checked against) answers as ``get`` does: it took a dangling link for an unreadable policy."""
    directory = tmp_path / "policies"
    (directory / "sub").mkdir(parents=True)
    (directory / "sub" / "k0.yaml").write_text(document(), encoding="utf-8")
    (directory / "sub" / "up").symlink_to("..")
    (tmp_path / "secret.yaml").write_text(document(), encoding="utf-8")
    (directory / "k1.yaml").symlink_to(target)
    policies = _store(directory)
    if answer == "read":
        assert policies.get("k1", judge=False).policy.version == "1"
        live = policies.live("k1")
        assert live is not None and live.policy.version == "1"
        return
    if answer == NO_POLICY:
        with pytest.raises(StrongroomError) as raised:
            policies.get("k1", judge=False)
        assert raised.value.reason == Reason.NO_RELEASE_POLICY
        assert policies.live("k1") is None
        return
    for look in (functools.partial(policies.get, judge=False), policies.live):
        with pytest.raises(StrongroomError) as raised:
            look("k1")
        assert raised.value.reason == Reason.POLICY_UNREADABLE
        assert answer in raised.value.message


def test_a_change_expecting_no_policy_replaces_a_dangling_link_the_key_has_none_by(
    tmp_path: Path,
) -> None:
    """``keys get-policy`` said a key whose ``<key>.yaml`` is a link to nothing within the
    directory has no policy, while ``set-policy --if-version ""`` on it was refused
    POLICY_CHANGED (its check asked ``lexists``, which the link passes): one rule for both."""
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "k1.yaml").symlink_to("..data/k1.yaml")  # a ConfigMap's, its key removed
    policies = _store(directory)
    with pytest.raises(StrongroomError) as raised:
        policies.get("k1", judge=False)
    assert raised.value.reason == Reason.NO_RELEASE_POLICY
    policies.write("k1", policies.check("k1", document()), expected_version="")
    assert not (directory / "k1.yaml").is_symlink()
    assert policies.get("k1", judge=False).document == document()


def test_a_link_leaving_and_reentering_the_directory_costs_no_lookup_per_reentry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each time a link's spelling came back into the directory (``../policies/``), the resolver
    worked out the directory's real path again, a lookup of each of its components: a policy
    linked through 40 links each spelling it 300 times (what whoever writes the directory may
    plant) took a second of the broker's CPU, its interpreter lock held, at every release. The
    directory's spellings are worked out once a lookup, however often a link re-enters it."""
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "k0.yaml").write_text(document(), encoding="utf-8")
    (directory / "k1.yaml").symlink_to("../policies/k0.yaml")
    (directory / "k2.yaml").symlink_to("../policies/" * 300 + "k0.yaml")
    real_lstat = os.lstat
    lookups = [0]

    def counting_lstat(path: Any, *, dir_fd: int | None = None) -> os.stat_result:
        lookups[0] += 1
        return real_lstat(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "lstat", counting_lstat)
    counted = []
    for key_id in ("k1", "k2"):
        lookups[0] = 0
        assert _store(directory).get(key_id, judge=False).document == document()
        counted.append(lookups[0])
    assert counted[1] == counted[0], counted


@pytest.mark.parametrize("spelt", [MAX_NAMES, MAX_NAMES + 1])
def test_links_spelling_more_names_than_the_bound_are_refused(tmp_path: Path, spelt: int) -> None:
    """The broker walks a link's names itself, each a step of the interpreter's: links spelling
    thousands of them (``./`` repeated, ``../policies/`` repeated) made each request's lookup
    of the policy walk them all, however many. Up to :data:`MAX_NAMES` names are walked, past
    them the lookup fails as past too many links (POLICY_UNREADABLE)."""
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "k0.yaml").write_text(document(), encoding="utf-8")
    # Two links (a link holds at most 4,095 bytes), each "." and empty names but its last.
    first = MAX_NAMES // 2
    (directory / "k1.yaml").symlink_to("." + "/" * (first - 1) + "half")
    (directory / "half").symlink_to("." + "/" * (spelt - first - 1) + "k0.yaml")
    policies = _store(directory)
    if spelt <= MAX_NAMES:
        assert policies.get("k1", judge=False).document == document()
        return
    for look in (functools.partial(policies.get, judge=False), policies.live):
        with pytest.raises(PolicyUnreadable) as raised:
            look("k1")
        assert "Too many levels of symbolic links" in raised.value.message


@pytest.mark.parametrize("proc", ["/proc", "no /proc"])
@pytest.mark.parametrize("look", ["get", "live"])
def test_a_configmap_update_during_a_lookup_gives_the_old_or_the_new_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, look: str, proc: str
) -> None:
    """The broker looks a ConfigMap's links up one name at a time: an update made between its
    reading ``..data`` and its looking in the directory it named (which the kubelet removes
    right after the swap) failed the lookup, NO_RELEASE_POLICY or POLICY_UNREADABLE for a key
    whose policy was there all along (after one update in six, the broker reading without
    pause and the mount updated every millisecond). The update is made before each of the
    lookup's opens in turn: the answer is the old document or the new one, never an error."""
    old, new = document(), document().replace('"1"', '"2"')
    real_open = os.open
    update_at = [0]  # the open before which the update is made (1-based; 0: none), counted down

    def updating_open(
        path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        update_at[0] -= 1
        if update_at[0] == 0:
            _configmap(directory, "..2026_12_07_02_05_00.2", {"k1.yaml": new})
        if proc == "no /proc" and str(path).startswith("/proc/"):
            raise FileNotFoundError(2, "No such file or directory")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def lookup() -> str:
        policies = _store(directory)  # its own cache: each lookup reads
        stored = policies.get("k1", judge=False) if look == "get" else policies.live("k1")
        assert stored is not None
        return stored.document

    monkeypatch.setattr(os, "open", updating_open)
    directory = tmp_path / "dry" / "policies"
    directory.parent.mkdir()
    _configmap(directory, "..2026_12_07_02_00_00.1", {"k1.yaml": old})
    update_at[0] = 10_000
    assert lookup() == old
    opens = 10_000 - update_at[0]
    answers = []
    for at in range(1, opens + 1):
        directory = tmp_path / f"update-before-open-{at}" / "policies"
        directory.parent.mkdir()
        _configmap(directory, "..2026_12_07_02_00_00.1", {"k1.yaml": old})
        update_at[0] = at
        try:
            answers.append(lookup())
        except StrongroomError as exc:
            answers.append(f"{exc.reason}: {exc.message}")
    assert set(answers) <= {old, new}, answers
    assert new in answers  # an update made before the last open is read
