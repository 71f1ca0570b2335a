#!/usr/bin/env python3
"""Creates a PKI with ``strongroom pki init`` and prints the Secrets the Helm chart references.

    python3 deploy/helm/pki_secrets.py --namespace strongroom --out ./pki-strongroom | kubectl apply -f -

- ``strongroom-step-ca`` (``stepCa.existingSecret``): what the in-chart step-ca serves with: ca.json,
  root and intermediate certificates, the intermediate key and the password that protects it.
- ``strongroom-pki-<service>`` for keybroker, modelstore and inference
  (``pki.provisionerSecrets.<service>``): what that service's init container needs to mint its
  one-time enrolment token (strongroom.json, the key of the service's OWN provisioner) and the root
  certificate. Each service's provisioner issues only that service's SPIFFE ID and the DNS names
  the chart gives it (``<name>``, ``<name>.<ns>``, ``<name>.<ns>.svc``, ``<name>.<ns>.svc.<cluster
  domain>``; pass ``--cluster-domain`` and ``--service-name`` when the values change them), so a
  node that sees one pod's Secret can obtain that one identity and no other.

The operator's own, unrestricted provisioner (``secrets/provisioner_key``: tokens for admin,
publisher and clients, ``strongroom pki token --dir ./pki-strongroom``) is in no Secret: it stays in
``--out`` with the operator.

With ``--upgrade`` (a PKI made by an earlier version, in ``--out``): runs ``strongroom pki upgrade``
on it, so that each service's provisioner issues the DNS name derived from its SPIFFE ID (README,
upgrade item 19), and prints the same Secrets from it again (apply them, restart step-ca, then the
services' pods, whose init containers mint tokens that replace their certificates). Pass the
``--namespace``, ``--step-ca-secret`` and ``--provisioner-secret-prefix`` given when the PKI was
made: the Secrets are printed under those names, and others would be new Secrets the chart does not
read (the DNS names come from the PKI itself: ``--cluster-domain`` and ``--service-name`` are not
needed).

With ``--simulated-tee-secret NAME`` (DEVELOPMENT ONLY, for values-development.yaml) a third Secret
holds a freshly generated simulated TEE chain (``simulatedTee.existingSecret``); run the script with
the project's Python (``.venv/bin/python``) for that, as it imports strongroom.

The PKI directory stays in ``--out``, including the ROOT KEY (secrets/root_ca_key): move it offline;
it is needed only to issue a new intermediate. Nothing secret is printed anywhere but the manifests
on stdout: pipe them to ``kubectl apply -f -`` or a sealed-secrets/SOPS pipeline, never to a shared
file. Paths inside ca.json are relative to the CA directory; the chart mounts the files under
/home/step and runs step-ca there. The Secret keys and their place in the CA directory are listed in
STEP_CA_FILES / PROVISIONER_FILES and must match values.yaml (stepCa.files, pki.provisionerFiles).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Secret key -> path under the CA directory (the layout of `strongroom pki init`).
STEP_CA_FILES = {
    "ca.json": "config/ca.json",
    "root_ca.crt": "certs/root_ca.crt",
    "intermediate_ca.crt": "certs/intermediate_ca.crt",
    "intermediate_ca_key": "secrets/intermediate_ca_key",
    "password": "secrets/password",
}
# Secret key -> path under a service's token directory (provisioners/<service>/ in the CA directory).
PROVISIONER_FILES = {
    "strongroom.json": "config/strongroom.json",
    "provisioner_key": "secrets/provisioner_key",
    "root_ca.crt": "certs/root_ca.crt",
}
# The chart's services that enrol from their pods (each gets its own provisioner and Secret).
SERVICES = ("keybroker", "modelstore", "inference")


def dns_names(service_name: str, namespace: str, cluster_domain: str) -> list[str]:
    """The DNS names the chart puts in a service's certificate (_helpers.tpl strongroom.dnsNames)."""
    return [
        service_name,
        f"{service_name}.{namespace}",
        f"{service_name}.{namespace}.svc",
        f"{service_name}.{namespace}.svc.{cluster_domain}",
    ]


def _secret(name: str, namespace: str, files: dict[str, bytes], component: str) -> str:
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/part-of": "strongroom",
                "app.kubernetes.io/component": component,
            },
        },
        "data": {k: base64.b64encode(v).decode("ascii") for k, v in sorted(files.items())},
    }
    # JSON is valid YAML; kubectl accepts a stream of documents separated by ---.
    return json.dumps(manifest, indent=2)


def _collect(ca_dir: Path, layout: dict[str, str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, rel in layout.items():
        path = ca_dir / rel
        if not path.is_file():
            raise SystemExit(
                f"pki_secrets: {path} missing: `strongroom pki init` wrote a different layout than "
                "this script and values.yaml (stepCa.files, pki.provisionerFiles) expect"
            )
        out[key] = path.read_bytes()
    return out


def _simulated_tee() -> dict[str, bytes]:
    """A new simulated TEE chain (certificates and keys), as SimulatedAuthority.save lays it out."""
    # Imported here: only this development option needs the strongroom package.
    from strongroom.dev.simulated import SimulatedAuthority

    with tempfile.TemporaryDirectory() as tmp:
        SimulatedAuthority.generate().save(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--out", type=Path, required=True, help="new directory for the PKI")
    parser.add_argument(
        "--upgrade",
        action="store_true",
        help="update the PKI already in --out (an earlier version's) and print its Secrets again",
    )
    parser.add_argument("--trust-domain", default="strongroom.internal")
    parser.add_argument("--ca-dns", default="step-ca", help="the CA's DNS name (its Service name)")
    parser.add_argument("--address", default=":9000", help="step-ca's listen address")
    parser.add_argument("--cluster-domain", default="cluster.local", help="values clusterDomain")
    parser.add_argument(
        "--service-name",
        action="append",
        default=[],
        metavar="SERVICE=NAME",
        help="a service's Service name when values change it (<service>.service.name; repeatable)",
    )
    parser.add_argument("--step-ca-secret", default="strongroom-step-ca")
    parser.add_argument(
        "--provisioner-secret-prefix",
        default="strongroom-pki-",
        help="the services' Secrets are PREFIX<service> (values pki.provisionerSecrets)",
    )
    parser.add_argument("--strongroom", default="strongroom", help="the strongroom executable")
    parser.add_argument(
        "--simulated-tee-secret",
        metavar="NAME",
        help="also emit a simulated TEE Secret (development)",
    )
    args = parser.parse_args(argv)
    names = {service: service for service in SERVICES}
    for pair in args.service_name:
        service, sep, name = pair.partition("=")
        if not sep or service not in names or not name:
            parser.error(
                f"--service-name {pair!r}: expected SERVICE=NAME, SERVICE one of {SERVICES}"
            )
        names[service] = name

    pki_dir: Path = args.out.resolve()
    if args.upgrade:
        if not (pki_dir / STEP_CA_FILES["ca.json"]).is_file():
            print(f"pki_secrets: {pki_dir} holds no PKI to upgrade", file=sys.stderr)
            return 2
        code = _strongroom(args, ["pki", "upgrade", "--dir", str(pki_dir)])
        if code != 0:
            return code
    else:
        if pki_dir.exists() and any(pki_dir.iterdir()):
            print(
                f"pki_secrets: {pki_dir} is not empty; refusing to overwrite a PKI "
                "(--upgrade updates one made by an earlier version)",
                file=sys.stderr,
            )
            return 2
        pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        code = _init(args, pki_dir, names)
        if code != 0:
            return code
    _print_secrets(args, pki_dir)
    return 0


def _strongroom(args: argparse.Namespace, command: list[str]) -> int:
    """Runs ``strongroom COMMAND`` (its output to standard error) and returns its exit status;
    a failure is its own one-line message (strongroom's) and a line of ours, never a traceback,
    and no Secret is printed after it."""
    try:
        result = subprocess.run([args.strongroom, *command], check=False, stdout=sys.stderr)
    except OSError as exc:
        print(f"pki_secrets: cannot run {args.strongroom}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if result.returncode != 0:
        print(
            f"pki_secrets: `strongroom {command[0]} {command[1]}` failed (exit status "
            f"{result.returncode}, its message above); no Secret printed",
            file=sys.stderr,
        )
        return result.returncode if result.returncode > 0 else 1
    return 0


def _init(args: argparse.Namespace, pki_dir: Path, names: dict[str, str]) -> int:
    """``strongroom pki init`` into ``pki_dir``, a provisioner of its own per service; its
    exit status."""
    return _strongroom(
        args,
        [
            "pki",
            "init",
            "--dir",
            str(pki_dir),
            "--trust-domain",
            args.trust_domain,
            "--dns",
            args.ca_dns,
            "--address",
            args.address,
            *(
                f"--workload={service}="
                + ",".join(dns_names(names[service], args.namespace, args.cluster_domain))
                for service in SERVICES
            ),
        ],
    )


def _print_secrets(args: argparse.Namespace, pki_dir: Path) -> None:
    """Prints the Secrets made from the PKI in ``pki_dir``."""
    step_ca = _collect(pki_dir, STEP_CA_FILES)
    print(_secret(args.step_ca_secret, args.namespace, step_ca, "step-ca"))
    for service in SERVICES:
        # What `strongroom pki init --workload` laid out for the service: its own provisioner only.
        files = _collect(pki_dir / "provisioners" / service, PROVISIONER_FILES)
        print("---")
        print(_secret(f"{args.provisioner_secret_prefix}{service}", args.namespace, files, service))
    if args.simulated_tee_secret:
        print("---")
        print(_secret(args.simulated_tee_secret, args.namespace, _simulated_tee(), "simulated-tee"))
    if args.upgrade:
        # The PKI was made (and its root key moved offline) before: what is left is to apply
        # these Secrets and restart what reads them (README, upgrade item 19).
        print(
            f"pki_secrets: PKI in {pki_dir} updated; apply these Secrets right after the chart's "
            "upgrade, restart step-ca (it reads ca.json only when it starts), then the services' "
            "pods (their init containers mint tokens with the derived names)",
            file=sys.stderr,
        )
        return
    print(
        f"pki_secrets: PKI written to {pki_dir}; move its root key offline before going further, "
        "and keep secrets/provisioner_key (it mints tokens for ANY identity) with the operator",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
