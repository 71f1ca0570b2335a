#!/usr/bin/env python3
"""Creates a PKI with ``strongroom pki init`` and prints the two Secrets the Helm chart references.

    python3 deploy/helm/pki_secrets.py --namespace strongroom --out ./pki-strongroom | kubectl apply -f -

- ``strongroom-step-ca`` (``stepCa.existingSecret``): what the in-chart step-ca serves with: ca.json,
  root and intermediate certificates, intermediate key and its password.
- ``strongroom-pki-provisioner`` (``pki.provisionerSecret``): what the pods' init containers need to
  mint one-time enrolment tokens (ca.json with the encrypted provisioner key, the provisioner
  password) and the root certificate.

The PKI directory stays in ``--out``, including the ROOT KEY: move it offline (it is needed only to
issue a new intermediate). Nothing secret is printed anywhere but the manifests on stdout; redirect
them to ``kubectl apply -f -`` or a sealed-secrets/SOPS pipeline, never to a shared file.

step-ca reads ca.json's paths as written, so paths under ``--out`` are rewritten to ``/home/step``,
where the chart mounts the files. Secret keys and their place under the PKI directory are listed in
STEP_CA_FILES / PROVISIONER_FILES and must match values.yaml (stepCa.files, pki.provisionerFiles).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

STEP_HOME = "/home/step"
# Secret key -> path under the PKI directory (the step layout `strongroom pki init` writes).
STEP_CA_FILES = {
    "ca.json": "config/ca.json",
    "root_ca.crt": "certs/root_ca.crt",
    "intermediate_ca.crt": "certs/intermediate_ca.crt",
    "intermediate_ca_key": "secrets/intermediate_ca_key",
    "password": "secrets/password",
}
PROVISIONER_FILES = {
    "ca.json": "config/ca.json",
    "provisioner_password": "secrets/provisioner_password",
    "root_ca.crt": "certs/root_ca.crt",
}


def _rebase(value: Any, old: str, new: str) -> Any:
    """Rewrites every string that is a path under ``old`` to the same path under ``new``."""
    if isinstance(value, dict):
        return {k: _rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    return value


def _secret(name: str, namespace: str, files: dict[str, bytes], component: str) -> str:
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "strongroom", "app.kubernetes.io/component": component},
        },
        "data": {k: base64.b64encode(v).decode("ascii") for k, v in sorted(files.items())},
    }
    # JSON is valid YAML; kubectl accepts a stream of documents separated by ---.
    return json.dumps(manifest, indent=2)


def _collect(pki_dir: Path, layout: dict[str, str], ca_json: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, rel in layout.items():
        if key == "ca.json":
            out[key] = ca_json
            continue
        path = pki_dir / rel
        if not path.is_file():
            raise SystemExit(
                f"pki_secrets: {path} missing: `strongroom pki init` wrote a different layout than "
                "this script and values.yaml (stepCa.files, pki.provisionerFiles) expect"
            )
        out[key] = path.read_bytes()
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--out", type=Path, required=True, help="new directory for the PKI")
    parser.add_argument("--trust-domain", default="strongroom.internal")
    parser.add_argument("--ca-dns", default="step-ca", help="the CA's DNS name (its Service name)")
    parser.add_argument("--step-ca-secret", default="strongroom-step-ca")
    parser.add_argument("--provisioner-secret", default="strongroom-pki-provisioner")
    parser.add_argument("--strongroom", default="strongroom", help="the strongroom executable")
    args = parser.parse_args(argv)

    pki_dir: Path = args.out.resolve()
    if pki_dir.exists() and any(pki_dir.iterdir()):
        print(f"pki_secrets: {pki_dir} is not empty; refusing to overwrite a PKI", file=sys.stderr)
        return 2
    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(
        [
            args.strongroom, "pki", "init", "--dir", str(pki_dir), "--trust-domain", args.trust_domain,
            "--dns", args.ca_dns, "--address", ":9000",
        ],
        check=True,
        stdout=sys.stderr,
    )
    config = json.loads((pki_dir / "config" / "ca.json").read_text(encoding="utf-8"))
    ca_json = (json.dumps(_rebase(config, str(pki_dir), STEP_HOME), indent=2) + "\n").encode()

    step_ca = _collect(pki_dir, STEP_CA_FILES, ca_json)
    provisioner = _collect(pki_dir, PROVISIONER_FILES, ca_json)
    print(_secret(args.step_ca_secret, args.namespace, step_ca, "step-ca"))
    print("---")
    print(_secret(args.provisioner_secret, args.namespace, provisioner, "bootstrap"))
    print(
        f"pki_secrets: PKI written to {pki_dir}; move its root key offline before going further",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
