#!/usr/bin/env python3
"""Creates a PKI with ``strongroom pki init`` and prints the two Secrets the Helm chart references.

    python3 deploy/helm/pki_secrets.py --namespace strongroom --out ./pki-strongroom | kubectl apply -f -

- ``strongroom-step-ca`` (``stepCa.existingSecret``): what the in-chart step-ca serves with: ca.json,
  root and intermediate certificates, the intermediate key and the password that protects it.
- ``strongroom-pki-provisioner`` (``pki.provisionerSecret``): what the pods' init containers need to
  mint one-time enrolment tokens (strongroom.json, the JWK provisioner key) and the root certificate.

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
PROVISIONER_FILES = {
    "strongroom.json": "config/strongroom.json",
    "provisioner_key": "secrets/provisioner_key",
    "root_ca.crt": "certs/root_ca.crt",
}


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
    parser.add_argument("--trust-domain", default="strongroom.internal")
    parser.add_argument("--ca-dns", default="step-ca", help="the CA's DNS name (its Service name)")
    parser.add_argument("--address", default=":9000", help="step-ca's listen address")
    parser.add_argument("--step-ca-secret", default="strongroom-step-ca")
    parser.add_argument("--provisioner-secret", default="strongroom-pki-provisioner")
    parser.add_argument("--strongroom", default="strongroom", help="the strongroom executable")
    parser.add_argument(
        "--simulated-tee-secret",
        metavar="NAME",
        help="also emit a simulated TEE Secret (development)",
    )
    args = parser.parse_args(argv)

    pki_dir: Path = args.out.resolve()
    if pki_dir.exists() and any(pki_dir.iterdir()):
        print(f"pki_secrets: {pki_dir} is not empty; refusing to overwrite a PKI", file=sys.stderr)
        return 2
    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(
        [
            args.strongroom,
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
        ],
        check=True,
        stdout=sys.stderr,
    )
    step_ca = _collect(pki_dir, STEP_CA_FILES)
    provisioner = _collect(pki_dir, PROVISIONER_FILES)
    print(_secret(args.step_ca_secret, args.namespace, step_ca, "step-ca"))
    print("---")
    print(_secret(args.provisioner_secret, args.namespace, provisioner, "bootstrap"))
    if args.simulated_tee_secret:
        print("---")
        print(_secret(args.simulated_tee_secret, args.namespace, _simulated_tee(), "simulated-tee"))
    print(
        f"pki_secrets: PKI written to {pki_dir}; move its root key offline before going further",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
