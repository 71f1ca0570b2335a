"""The CA directory: files, permissions, ca.json contents, and how step-ca is started."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from strongroom.errors import AlreadyExists, InvalidArgument
from strongroom.pki import StepCa, init_ca
from strongroom.pki._duration import go_duration, parse_duration
from strongroom.pki.bootstrap import Workload
from strongroom.pki.errors import CertificateInvalid, InvalidPkiConfig
from strongroom.pki.layout import CaLayout
from strongroom.pki.token import mint_token
from tests.pki.helpers import free_port


def test_layout_files_and_permissions(tmp_path: Path) -> None:
    layout = init_ca(
        tmp_path / "ca",
        trust_domain="strongroom.test",
        dns_names=["ca.strongroom.test", "localhost"],
        address="0.0.0.0:9443",
        default_lifetime=timedelta(minutes=30),
        max_lifetime=timedelta(hours=2),
        min_lifetime=timedelta(seconds=10),
    )
    assert layout.url == "https://ca.strongroom.test:9443"
    for secret in ("password", "root_ca_key", "intermediate_ca_key", "provisioner_key"):
        mode = stat.S_IMODE((layout.directory / "secrets" / secret).stat().st_mode)
        assert mode == 0o600, secret
    assert stat.S_IMODE((layout.directory / "secrets").stat().st_mode) == 0o700
    for key in ("root_ca_key", "intermediate_ca_key"):
        assert b"ENCRYPTED PRIVATE KEY" in (layout.directory / "secrets" / key).read_bytes()
    config = json.loads(layout.config_path.read_text())
    password = layout.password_path.read_text().strip()
    assert password not in layout.config_path.read_text()
    assert "password" not in config
    assert config["address"] == "0.0.0.0:9443"
    assert config["dnsNames"] == ["ca.strongroom.test", "localhost"]
    assert config["tls"]["minVersion"] == 1.3
    assert config["db"]["type"] == "bbolt"
    (provisioner,) = config["authority"]["provisioners"]
    assert provisioner["type"] == "JWK" and provisioner["name"] == "strongroom"
    assert provisioner["key"]["kid"] == layout.provisioner().kid
    assert "d" not in provisioner["key"]  # public key only
    assert provisioner["claims"] == {
        "minTLSCertDuration": "10s",
        "maxTLSCertDuration": "7200s",
        "defaultTLSCertDuration": "1800s",
        "disableRenewal": False,
    }
    assert not Path(config["crt"]).is_absolute()  # relocatable: paths relative to the directory


def test_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", trust_domain="strongroom.test")
    with pytest.raises(AlreadyExists):
        init_ca(tmp_path / "ca", trust_domain="strongroom.test")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trust_domain": "Not Valid"},
        {"trust_domain": "t.test", "dns_names": []},
        {"trust_domain": "t.test", "address": "localhost"},
        {"trust_domain": "t.test", "min_lifetime": timedelta(hours=2)},
        {"trust_domain": "t.test", "provisioner_name": "a:b"},
    ],
)
def test_rejects_bad_settings(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        init_ca(tmp_path / "ca", **kwargs)  # type: ignore[arg-type]


def test_password_reaches_step_ca_as_a_file_not_argv(ca: StepCa) -> None:
    assert ca.pid is not None
    argv = Path(f"/proc/{ca.pid}/cmdline").read_bytes().split(b"\0")
    password = ca.layout.password_path.read_bytes().strip()
    assert password not in b" ".join(argv)
    assert b"--password-file" in argv
    environment = Path(f"/proc/{ca.pid}/environ").read_bytes()
    assert password not in environment
    assert os.path.samefile(f"/proc/{ca.pid}/cwd", ca.layout.directory)


def test_missing_binary_is_reported_clearly(tmp_path: Path) -> None:
    layout = init_ca(tmp_path / "ca", trust_domain="strongroom.test")
    with pytest.raises(InvalidPkiConfig, match=r"build\.sh"):
        StepCa(layout, binary=tmp_path / "nope").start()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("2d", 172800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5", "m5", "5x", "-5s", "0s", "5m garbage"])
def test_malformed_durations(text: str) -> None:
    with pytest.raises(InvalidPkiConfig):
        parse_duration(text)


def test_go_durations() -> None:
    assert go_duration(timedelta(hours=1)) == "3600s"
    assert go_duration(timedelta(milliseconds=1500)) == "1500ms"


@pytest.mark.parametrize(
    ("damaged", "load"),
    [
        ("secrets/provisioner_key", lambda layout: layout.provisioner()),
        ("secrets/intermediate_ca_key", lambda layout: layout.load_intermediate()),
        ("certs/intermediate_ca.crt", lambda layout: layout.load_intermediate()),
    ],
    ids=["provisioner-key", "intermediate-key", "intermediate-cert"],
)
def test_a_damaged_ca_file_is_a_clear_error_naming_it(
    tmp_path: Path, damaged: str, load: Callable[[CaLayout], object]
) -> None:
    """The CA's own key and certificate files were parsed bare: a damaged one gave the operator a
    cryptography ValueError traceback instead of an error naming the file."""
    layout = init_ca(tmp_path / "ca", trust_domain="strongroom.test")
    path = layout.directory / damaged
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(InvalidPkiConfig) as info:
        load(layout)
    assert str(path) in info.value.message


def test_a_damaged_root_certificate_is_a_clear_error_when_minting(tmp_path: Path) -> None:
    layout = init_ca(tmp_path / "ca", trust_domain="strongroom.test")
    with pytest.raises(InvalidPkiConfig, match="root certificate"):
        mint_token(
            layout.provisioner(),
            ca_url=layout.url,
            subject="spiffe://strongroom.test/x",
            sans=["spiffe://strongroom.test/x"],
            root_pem=b"not a certificate",
        )


def test_refuses_a_ca_directory_others_may_write(tmp_path: Path) -> None:
    # Whoever may write the CA directory can swap config/ca.json after init (a provisioner of their
    # own) or certs/root_ca.crt, and step-ca, holding the intermediate key, would serve it.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(InvalidPkiConfig) as info:
        init_ca(shared, trust_domain="strongroom.test")
    assert info.value.reason == "CA_DIR_UNSAFE"
    assert str(shared) in info.value.message
    assert not any(shared.iterdir())  # refused before any secret was written


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the directory to another user")
def test_refuses_a_ca_directory_another_user_owns(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o755)
    os.chown(planted, 4242, 4242)  # pre-created by someone else, e.g. in /tmp
    with pytest.raises(InvalidPkiConfig) as info:
        init_ca(planted, trust_domain="strongroom.test")
    assert info.value.reason == "CA_DIR_UNSAFE"
    assert not any(planted.iterdir())


def test_no_ca_directory_is_writable_by_others_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o002)  # common for user-private groups; 0 in some containers
    try:
        layout = init_ca(tmp_path / "ca", trust_domain="strongroom.test", workloads=[Workload("a")])
    finally:
        os.umask(previous)
    for path in [layout.directory, *layout.directory.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not mode & 0o022, f"{path} is mode {mode:o}"
    assert stat.S_IMODE(layout.directory.stat().st_mode) == 0o755


@pytest.mark.parametrize("listen", ["127.0.0.1", "0.0.0.0"])
def test_serve_does_not_need_the_ca_url_to_resolve_on_the_ca_host(
    step_ca_binary: Path, tmp_path: Path, listen: str
) -> None:
    """StepCa's start-up probe went to the CA's URL: where its name does not resolve on the CA's
    own host (a name served by a load balancer or only inside the cluster), `pki serve` waited
    30 s, killed the healthy step-ca and failed. It probes the listen address now, still
    verifying the certificate against the pinned root and the URL's host name."""
    port = free_port()
    layout = init_ca(
        tmp_path / "ca",
        trust_domain="strongroom.test",
        dns_names=["ca.strongroom.invalid"],  # .invalid never resolves (RFC 6761)
        address=f"{listen}:{port}",
        url=f"https://ca.strongroom.invalid:{port}",
    )
    ca = StepCa(layout, binary=step_ca_binary, startup_timeout=5.0)
    try:
        ca.start()
        assert ca.running()
    finally:
        ca.stop()


def test_the_start_up_probe_still_pins_the_root_and_the_name(
    step_ca_binary: Path, tmp_path: Path
) -> None:
    port = free_port()
    layout = init_ca(
        tmp_path / "ca",
        trust_domain="strongroom.test",
        dns_names=["ca.strongroom.invalid"],
        address=f"127.0.0.1:{port}",
        url=f"https://other.strongroom.invalid:{port}",  # not a name in step-ca's certificate
    )
    ca = StepCa(layout, binary=step_ca_binary, startup_timeout=5.0)
    try:
        with pytest.raises(CertificateInvalid) as info:
            ca.start()
        assert info.value.reason == "CA_CERT_UNVERIFIED"
        assert "other.strongroom.invalid" in info.value.message
        assert not ca.running()  # a probe that cannot succeed stops the process it started
    finally:
        ca.stop()


def test_step_ca_sees_none_of_the_starting_process_secrets(
    step_ca_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """step-ca inherited the whole environment of whatever started it (a service holding its HSM
    PIN, the CLI holding an enrolment token), readable by anyone who can read the CA process's
    /proc/PID/environ. It now gets an allow-list: locale, time zone, PATH, Go tuning."""
    monkeypatch.setenv("STRONGROOM_HSM_PIN", "1234-secret-pin")
    monkeypatch.setenv("STRONGROOM_PKI_TOKEN", "eyJ-secret-token")
    monkeypatch.setenv("LC_TIME", "C")
    port = free_port()
    layout = init_ca(
        tmp_path / "ca",
        trust_domain="strongroom.test",
        dns_names=["localhost"],
        address=f"127.0.0.1:{port}",
        url=f"https://localhost:{port}",
    )
    ca = StepCa(layout, binary=step_ca_binary, startup_timeout=10.0)
    try:
        ca.start()
        raw = Path(f"/proc/{ca.pid}/environ").read_bytes()
    finally:
        ca.stop()
    environment = dict(item.split(b"=", 1) for item in raw.split(b"\0") if item)
    assert b"STRONGROOM_HSM_PIN" not in environment
    assert b"STRONGROOM_PKI_TOKEN" not in environment
    assert b"secret" not in raw
    assert environment[b"STEPPATH"] == str(layout.directory).encode()
    assert environment[b"LC_TIME"] == b"C"
    assert environment[b"PATH"] == os.environ["PATH"].encode()


def test_a_ca_without_a_database_is_refused(step_ca_binary: Path, tmp_path: Path) -> None:
    """``pki init --db none`` made a CA whose every revocation step-ca answers with HTTP 501 and
    which accepts a used token again after a restart: superseded certificates could never be
    revoked. init refuses that mode, and a directory made by an older init is refused at start."""
    with pytest.raises(InvalidPkiConfig, match="revoke"):
        init_ca(tmp_path / "none", trust_domain="strongroom.test", database="none")  # type: ignore[arg-type]
    assert not (tmp_path / "none").exists()
    layout = init_ca(tmp_path / "ca", trust_domain="strongroom.test", address="127.0.0.1:1")
    config = json.loads(layout.config_path.read_text())
    del config["db"]  # what `--db none` wrote
    layout.config_path.write_text(json.dumps(config))
    ca = StepCa(layout, binary=step_ca_binary, startup_timeout=5.0)
    with pytest.raises(InvalidPkiConfig) as info:
        ca.start()
    assert info.value.reason == "CA_DATABASE_MISSING"
    assert "no database" in info.value.message
    assert not ca.running()


def test_the_cli_offers_no_database_less_ca(tmp_path: Path) -> None:
    from strongroom.cli.main import main

    argv = [
        "pki",
        "init",
        "--dir",
        str(tmp_path / "ca"),
        "--trust-domain",
        "x.test",
        "--db",
        "none",
    ]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert not (tmp_path / "ca").exists()


def test_two_simultaneous_inits_make_one_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both runs passed the "no CA here yet" check before either wrote anything, then each wrote
    its own password, keys and root over the other's: the directory ended up with keys the
    password beside them may not decrypt. Now one run makes the CA and the other is refused."""
    import threading

    from strongroom.pki import bootstrap

    real_generate = bootstrap.generate_key
    barrier = threading.Barrier(2)

    def slow_generate() -> object:
        key = real_generate()
        # Both runs are past the first check before either writes (the race, made certain).
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=5)
        return key

    monkeypatch.setattr(bootstrap, "generate_key", slow_generate)
    outcomes: list[object] = []

    def run() -> None:
        try:
            outcomes.append(init_ca(tmp_path / "ca", trust_domain="strongroom.test"))
        except AlreadyExists as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    layouts = [o for o in outcomes if isinstance(o, CaLayout)]
    assert len(layouts) == 1, outcomes
    refused = next(o for o in outcomes if not isinstance(o, CaLayout))
    assert refused in {"CA_INIT_IN_PROGRESS", "CA_EXISTS"}
    layouts[0].load_intermediate()  # the password beside the keys decrypts them


@pytest.mark.parametrize(
    "name", ["bad name", "ca.example.test,evil.test", "-lead.test", "a" * 64 + ".test", "ca..test"]
)
def test_the_cas_own_names_are_checked(tmp_path: Path, name: str) -> None:
    """Workload names were checked, the CA's own ``--dns`` names were not: any string went into
    step-ca's certificate and the token audiences."""
    with pytest.raises(InvalidPkiConfig, match="neither a DNS name nor an IP address"):
        init_ca(tmp_path / "ca", trust_domain="strongroom.test", dns_names=[name])
    assert not (tmp_path / "ca").exists()


def test_an_init_that_stopped_half_way_can_be_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ca.json`` is what marks a directory as holding a CA (``init`` refuses such a directory,
    and so does the compose bootstrap's check). It was written before ``strongroom.json``: an init
    stopped between the two (a full disk, a killed container) left a directory that every command
    refused ("not an initialised CA directory (run 'strongroom pki init')") and that ``init``
    refused too ("already holds a CA"). Now ``ca.json`` is the last file written."""
    from strongroom.pki import bootstrap, layout

    base = tmp_path / "ca"
    real_write = bootstrap.write_public

    def disk_full_at_the_metadata(path: Path, data: bytes) -> None:
        if path == base / layout.META:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data)

    with monkeypatch.context() as patched:
        patched.setattr(bootstrap, "write_public", disk_full_at_the_metadata)
        with pytest.raises(OSError, match="No space left"):
            init_ca(base, trust_domain="strongroom.test", workloads=[Workload("keybroker")])
    assert not (base / layout.CONFIG).exists()

    again = init_ca(base, trust_domain="strongroom.test", workloads=[Workload("keybroker")])
    again.load_intermediate()  # the password beside the keys decrypts them
    assert again.workload("keybroker").provisioner().name == "strongroom-keybroker"
    config = json.loads(again.config_path.read_text())
    kids = {p["key"]["kid"] for p in config["authority"]["provisioners"]}
    assert kids == {again.provisioner().kid, again.workload("keybroker").provisioner().kid}
