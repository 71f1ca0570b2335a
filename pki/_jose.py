"""The sliver of JOSE step-ca needs: EC P-256 JWKs, RFC 7638 thumbprints and compact ES256 JWS."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from strongroom import jsonparse

_P256_BYTES = 32


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses everywhere."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decodes unpadded base64url."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _require_p256(key: ec.EllipticCurvePublicKey) -> None:
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"ES256 needs a P-256 key, not {key.curve.name}")


def public_jwk_members(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The required members of an EC public JWK (RFC 7518 §6.2.1)."""
    _require_p256(key)
    numbers = key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url(numbers.x.to_bytes(_P256_BYTES, "big")),
        "y": b64url(numbers.y.to_bytes(_P256_BYTES, "big")),
    }


def thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 SHA-256 thumbprint: the hash of the required members, sorted, without whitespace."""
    canonical = json.dumps(public_jwk_members(key), sort_keys=True, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode()).digest())


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public JWK step-ca expects in a JWK provisioner: ``use=sig``, ``alg=ES256``, ``kid``."""
    return {"use": "sig", "alg": "ES256", "kid": thumbprint(key), **public_jwk_members(key)}


def _json_segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def sign_es256(
    key: ec.EllipticCurvePrivateKey, header: dict[str, Any], payload: dict[str, Any]
) -> str:
    """Signs a compact JWS with ES256; the signature is the raw ``r || s`` form (RFC 7518 §3.4)."""
    _require_p256(key.public_key())
    signing_input = f"{_json_segment(header)}.{_json_segment(payload)}"
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
    return f"{signing_input}.{b64url(signature)}"


def unverified_claims(token: str) -> dict[str, Any]:
    """Reads a compact JWT's payload WITHOUT checking its signature (the CA checks it)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("a compact JWT has three dot-separated parts")
    claims = jsonparse.loads(b64url_decode(parts[1]))
    if not isinstance(claims, dict):
        raise ValueError("the JWT payload is not a JSON object")
    return claims
