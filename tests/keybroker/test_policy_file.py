"""What the broker reads as a key's policy file: a regular file in the policy directory, bounded;
symlinks within the directory (a Kubernetes ConfigMap's) followed, none leading out of it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from strongroom.keybroker.errors import PolicyUnreadable, StoredPolicyInvalid
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.policy_bounds import MAX_POLICY_BYTES
from strongroom.reasons import Reason
from tests.keybroker.test_policy_store import DOMAIN, document


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
