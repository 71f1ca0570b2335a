"""``strongroom pki ...``: create and run the CA, mint enrolment tokens, enrol a workload, revoke.

Secrets come from files or the environment, never from the command line: the CA password lives in
the CA directory, tokens are read from ``--token-file`` or ``$STRONGROOM_PKI_TOKEN``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from strongroom.pki._duration import parse_duration
from strongroom.pki._x509 import load_chain, uri_sans
from strongroom.pki.bootstrap import Workload, init_ca, upgrade_ca, workload_template
from strongroom.pki.client import REVOCATION_REASONS, CaClient
from strongroom.pki.errors import CaUnavailable, InvalidPkiConfig
from strongroom.pki.identity import WorkloadIdentity
from strongroom.pki.layout import CaLayout, workload_dir
from strongroom.pki.stepca import StepCa
from strongroom.pki.token import mint_revoke_token, mint_token, with_identity_names
from strongroom.reasons import Reason
from strongroom.spiffe import SpiffeId, identity_dns_name

TOKEN_ENV = "STRONGROOM_PKI_TOKEN"  # noqa: S105 - the variable name, not a secret


def register(sub: Any) -> None:
    """Adds ``pki init|upgrade|serve|token|template|enrol|revoke``."""
    pki = sub.add_parser("pki", help="internal CA (step-ca) and workload certificates")
    commands = pki.add_subparsers(dest="pki_command", metavar="PKI_COMMAND", required=True)

    init = commands.add_parser("init", help="create a CA directory (root, intermediate, ca.json)")
    init.add_argument("--dir", type=Path, required=True, help="CA directory to create")
    init.add_argument("--trust-domain", default="strongroom.internal")
    init.add_argument(
        "--dns",
        action="append",
        dest="dns_names",
        metavar="NAME",
        help="name or IP in the CA's TLS certificate (repeatable; default localhost)",
    )
    init.add_argument("--address", default="127.0.0.1:9000", help="listen address HOST:PORT")
    init.add_argument("--url", help="URL clients use (default https://<first --dns>:<port>)")
    init.add_argument("--default-lifetime", default="1h", help="default certificate lifetime")
    init.add_argument("--max-lifetime", default="24h")
    init.add_argument("--min-lifetime", default="5m")
    init.add_argument("--db", choices=("bbolt", "badgerv2"), default="bbolt")
    init.add_argument(
        "--workload",
        action="append",
        dest="workloads",
        default=[],
        metavar="SERVICE[=DNS,...]",
        help="a provisioner of its own for spiffe://<trust-domain>/SERVICE that issues only that "
        "ID and these DNS names (repeatable); its token directory is DIR/provisioners/SERVICE",
    )
    init.set_defaults(func=_init)

    upgrade = commands.add_parser(
        "upgrade",
        help="update a CA made by an earlier version (workload provisioners' templates)",
        description="Makes each workload provisioner issue the DNS name derived from its "
        "SPIFFE ID, which clients expecting that identity check; restart step-ca after, then "
        "copy the provisioners/<service>/ directories to the workloads again and give each a "
        "fresh token (README, upgrade item 19).",
    )
    upgrade.add_argument("--dir", type=Path, required=True, help="the CA directory")
    upgrade.set_defaults(func=_upgrade)

    serve = commands.add_parser("serve", help="run step-ca for a CA directory until stopped")
    serve.add_argument("--dir", type=Path, required=True)
    serve.add_argument("--binary", type=Path, help="step-ca binary (default $STRONGROOM_STEP_CA)")
    serve.set_defaults(func=_serve)

    token = commands.add_parser("token", help="print a one-time enrolment token")
    token.add_argument("--dir", type=Path, required=True)
    token.add_argument("--identity", required=True, help="spiffe://<trust-domain>/<service>")
    token.add_argument(
        "--dns", action="append", dest="dns_names", default=[], metavar="NAME", help="DNS SAN"
    )
    token.add_argument("--lifetime", default="5m", help="token lifetime (default 5m)")
    token.add_argument("--ca-url", help="CA URL the token is for (default: the directory's)")
    token.set_defaults(func=_token)

    template = commands.add_parser(
        "template",
        help="print the X.509 template that restricts a step-ca provisioner to one identity",
    )
    template.add_argument("--identity", required=True, help="spiffe://<trust-domain>/<service>")
    template.add_argument(
        "--dns", action="append", dest="dns_names", default=[], metavar="NAME", help="DNS SAN"
    )
    template.set_defaults(func=_template)

    enrol = commands.add_parser(
        "enrol", help=f"enrol with a token (from --token-file or ${TOKEN_ENV}) into a state dir"
    )
    enrol.add_argument("--ca-url", required=True)
    enrol.add_argument("--root", type=Path, required=True, help="root certificate to pin (PEM)")
    enrol.add_argument("--token-file", type=Path)
    enrol.add_argument("--state-dir", type=Path, required=True)
    enrol.add_argument("--lifetime", help="certificate lifetime (default: the CA's)")
    enrol.set_defaults(func=_enrol)

    revoke = commands.add_parser(
        "revoke",
        help="revoke a certificate at the CA (passive: step-ca will no longer renew it)",
        description="Revokes a certificate at step-ca with a one-time token from the CA "
        "directory's provisioner key. Passive revocation: step-ca refuses to renew or re-key it; "
        "it stays valid for TLS until it expires (step-ca 0.19 has no CRL or OCSP).",
    )
    revoke.add_argument("--dir", type=Path, required=True, help="the CA directory (provisioner)")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--serial", help="serial: 0x-prefixed or colon-separated hex (as logged), or decimal"
    )
    which.add_argument("--cert", type=Path, help="PEM file whose first certificate to revoke")
    revoke.add_argument(
        "--reason-code",
        choices=sorted(REVOCATION_REASONS),
        default="unspecified",
        help="RFC 5280 reason (default unspecified; key-compromise for a stolen key)",
    )
    revoke.add_argument("--reason", default="", help="free text kept in the CA's database")
    revoke.add_argument("--ca-url", help="CA URL (default: the directory's)")
    revoke.set_defaults(func=_revoke)


def _init(args: argparse.Namespace) -> int:
    layout = init_ca(
        args.dir,
        trust_domain=args.trust_domain,
        dns_names=args.dns_names or ["localhost"],
        address=args.address,
        url=args.url,
        default_lifetime=parse_duration(args.default_lifetime),
        max_lifetime=parse_duration(args.max_lifetime),
        min_lifetime=parse_duration(args.min_lifetime),
        database=args.db,
        workloads=[Workload.parse(spec) for spec in args.workloads],
    )
    root = x509.load_pem_x509_certificate(layout.root_pem)
    fingerprint = hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    print(f"CA directory:     {layout.directory}")
    print(f"trust domain:     {layout.trust_domain}")
    print(f"URL:              {layout.url}")
    print(f"root certificate: {layout.root_cert_path}")
    print(f"root SHA-256:     {fingerprint}")
    for service in layout.workloads:
        print(f"workload {service}: {layout.directory / workload_dir(service)}")
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    changed = upgrade_ca(args.dir)
    workloads = set(CaLayout.load(args.dir).workloads)
    if any(name in workloads for name in changed):
        print(
            f"updated the provisioners of {', '.join(changed)}: restart step-ca, then give each "
            "workload a fresh token (minted from its updated provisioners/<service>/ directory)",
            file=sys.stderr,
        )
    elif changed:
        # Only the operator's template (compose's CA has no token directories): what matters is
        # the restart, which compose's `up` does not make (step-ca's container is unchanged).
        print(
            f"updated the provisioner of {', '.join(changed)}: restart step-ca, which reads "
            "ca.json only when it starts (compose: `docker-compose restart step-ca` once the "
            "`up` is done); fresh tokens minted with this directory ask for the derived names",
            file=sys.stderr,
        )
    else:
        print("the CA's provisioners are up to date", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    ca = StepCa(args.dir, binary=args.binary)

    stopping: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        ca.terminate()  # the wait below returns once step-ca has exited

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        ca.start()
    except CaUnavailable:
        if stopping:
            return 0  # asked to stop while step-ca was still starting
        raise
    print(f"step-ca serving {ca.url} (log: {ca.layout.log_path})", file=sys.stderr, flush=True)
    try:
        status = ca.wait()
    finally:
        ca.stop()
    return 0 if status in (0, -signal.SIGTERM, -signal.SIGINT) else 1


def _token(args: argparse.Namespace) -> int:
    layout = CaLayout.load(args.dir)
    identity = SpiffeId.parse(args.identity)
    if not identity.member_of(layout.trust_domain):
        raise InvalidPkiConfig(
            f"{identity} is not in this CA's trust domain {layout.trust_domain!r}"
        )
    sans = with_identity_names([str(identity), *args.dns_names])
    if layout.sans and sorted(set(sans)) != sorted(set(layout.sans)):
        # The CA would refuse it too (the provisioner's template); say so here, clearly.
        derived = identity_dns_name(identity)
        if derived not in layout.sans and sorted(set(sans) - {derived}) == sorted(set(layout.sans)):
            raise InvalidPkiConfig(
                f"the provisioner {layout.provisioner_name!r} was made before workload "
                f"certificates carried the DNS name derived from their SPIFFE ID ({derived}), "
                "which clients expecting this identity now check: update the CA's provisioners "
                "(`strongroom pki upgrade --dir CA`, then copy its provisioners/<service>/ "
                "directories to the workloads again; README, upgrade item 19)",
                reason=Reason.PROVISIONER_OUTDATED,
            )
        raise InvalidPkiConfig(
            f"the provisioner {layout.provisioner_name!r} issues only {list(layout.sans)}, "
            f"not {sans}"
        )
    print(
        mint_token(
            layout.provisioner(),
            ca_url=args.ca_url or layout.url,
            subject=str(identity),
            sans=sans,
            lifetime=parse_duration(args.lifetime),
            root_pem=layout.root_pem,
        )
    )
    return 0


def _template(args: argparse.Namespace) -> int:
    print(workload_template(str(SpiffeId.parse(args.identity)), args.dns_names), end="")
    return 0


def _read_token(path: Path | None) -> str:
    if path is not None:
        try:
            return path.read_bytes().decode("ascii").strip()
        except UnicodeDecodeError:
            # A JWT is ASCII: anything else is the wrong file (and is not echoed, it may be secret).
            raise InvalidPkiConfig(
                f"{path} does not hold an enrolment token (a JWT is ASCII text)",
                reason=Reason.BAD_TOKEN,
            ) from None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise InvalidPkiConfig(f"give the enrolment token with --token-file or ${TOKEN_ENV}")
    return token


def _enrol(args: argparse.Namespace) -> int:
    ca = CaClient(args.ca_url, args.root.read_bytes())
    identity = WorkloadIdentity.enrol(
        ca,
        _read_token(args.token_file),
        lifetime=parse_duration(args.lifetime) if args.lifetime else None,
        state_dir=args.state_dir,
        auto_renew=False,
    )
    with identity:
        credentials = identity.credentials
        print(f"enrolled {credentials.spiffe_id}")
        print(f"serial:    {credentials.serial:x}")
        print(f"not after: {credentials.not_after.isoformat()}")
        print(f"state:     {args.state_dir}")
    return 0


def parse_serial(text: str) -> int:
    """``0x``-prefixed hex, colon-separated hex (``95:92:2c``) or decimal; nothing ambiguous."""
    value = text.strip()
    try:
        if value.lower().startswith("0x"):
            serial = int(value[2:], 16)
        elif ":" in value:
            serial = int(value.replace(":", ""), 16)
        elif value.isdigit():
            serial = int(value, 10)
        else:
            raise ValueError(value)
    except ValueError:
        raise InvalidPkiConfig(
            f"serial {text!r} is neither decimal nor hex with a 0x prefix (Strongroom logs and "
            "'pki enrol' show hex: write 0x<hex>)"
        ) from None
    if serial <= 0:
        raise InvalidPkiConfig(f"serial {text!r} is not a positive integer")
    return serial


def _revoke(args: argparse.Namespace) -> int:
    layout = CaLayout.load(args.dir)
    described = ""
    if args.cert is not None:
        leaf = load_chain(args.cert.read_bytes())[0]
        serial = leaf.serial_number
        described = " ".join(uri_sans(leaf)) or leaf.subject.rfc4514_string()
    else:
        serial = parse_serial(args.serial)
    ca_url = args.ca_url or layout.url
    token = mint_revoke_token(layout.provisioner(), ca_url=ca_url, serial=serial)
    revoked = CaClient(ca_url, layout.root_pem).revoke(
        serial,
        reason_code=REVOCATION_REASONS[args.reason_code],
        comment=args.reason,
        token=token,
    )
    what = f"serial 0x{serial:x} (decimal {serial})" + (f", {described}" if described else "")
    print(f"{'revoked' if revoked else 'already revoked'}: {what}")
    return 0
