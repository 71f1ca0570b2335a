#!/usr/bin/env bash
# One-shot bootstrap job of the compose stack (runs in the strongroom SoftHSM image, uid 10001).
#
#   bootstrap.sh                 everything below, idempotently (what `docker-compose up` runs)
#   bootstrap.sh token NAME...   mint fresh one-time enrolment tokens only (e.g. publisher, admin)
#
# 1. PKI: `strongroom pki init` into the step-ca volume unless ca.json exists (else `strongroom
#    pki upgrade` of it, which changes nothing once done); publish the root certificate (public)
#    into the pki-public volume that every service mounts read-only.
# 2. One-time enrolment tokens, one per identity, each into that identity's own volume so a service
#    never sees another's token. Tokens are minted offline (no CA round trip) and expire after
#    STRONGROOM_TOKEN_LIFETIME; the SPIFFE ID and DNS SANs come from the identity's config file, so the
#    token always matches the CSR the service will send.
# 3. Key broker secrets (DEVELOPMENT only, kept on the keybroker-secrets volume): HSM user PIN, the
#    32-byte nonce key, the audit log's Ed25519 head-signing key (its public half beside it, for
#    `strongroom audit verify`) and the Ed25519 release-signing key, created once and never
#    overwritten (the PIN protects the token); a certificate over the release-signing key is
#    published to pki-public for inference (STRONGROOM_RELEASE_SIGNING_CERT_DAYS, default 365),
#    made again when it ends within 60 days (half its validity, if less) or no longer certifies the key.
# 4. DEVELOPMENT HSM: initialise the SoftHSM2 token unless it exists; the SO PIN is random, used once
#    and discarded (a development token never needs SO operations again).
# 5. Simulated TEE (development mode only): the fake AMD/Intel chain the simulated attester signs with
#    and the broker trusts, created once on the simulated-tee volume.
#
# Secrets never appear on a command line or in the log; files are written with umask 077 and renamed
# into place, so a reader never sees half a file.
set -euo pipefail
umask 077

trust_domain=${STRONGROOM_TRUST_DOMAIN:-strongroom.internal}
lifetime=${STRONGROOM_TOKEN_LIFETIME:-10m}
# Validity of a fresh release-signing certificate (days); renewed at an `up` within 60 days of its end
# (half its validity, if less).
release_cert_days=${STRONGROOM_RELEASE_SIGNING_CERT_DAYS:-365}
ca_dir=${STRONGROOM_CA_DIR:-/home/step}
ca_root_in_dir=${STRONGROOM_CA_ROOT:-certs/root_ca.crt}
# The paths are the compose mounts; the variables exist for tests (tests/deploy) only.
config_dir=${STRONGROOM_BOOTSTRAP_CONFIG_DIR:-/etc/strongroom/compose}
token_root=${STRONGROOM_BOOTSTRAP_TOKEN_ROOT:-/run/strongroom/bootstrap}
secrets_dir=${STRONGROOM_BOOTSTRAP_SECRETS_DIR:-/run/secrets}
pki_public=${STRONGROOM_BOOTSTRAP_PKI_PUBLIC:-/run/strongroom/pki}
hsm_dir=${STRONGROOM_BOOTSTRAP_HSM_DIR:-/var/lib/strongroom/softhsm}
simulated_tee_dir=${STRONGROOM_BOOTSTRAP_SIMULATED_TEE_DIR:-/var/lib/strongroom/simulated-tee}
collateral_dir=${STRONGROOM_BOOTSTRAP_COLLATERAL_DIR:-/var/lib/strongroom/collateral}
hsm_label=${STRONGROOM_HSM_TOKEN_LABEL:-strongroom}
hsm_module=${STRONGROOM_HSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
services=(keybroker modelstore inference)
clients=(publisher admin client)

log() { echo "bootstrap: $*" >&2; }

# Writes stdin to $1 atomically (same directory, then rename), with mode $2 (default 0600).
write_atomic() {
  local tmp
  tmp=$(mktemp "$(dirname "$1")/.$(basename "$1").XXXXXX")
  cat >"$tmp"
  chmod "${2:-0600}" "$tmp"
  mv -f "$tmp" "$1"
}

init_pki() {
  if [ -f "$ca_dir/config/ca.json" ]; then
    log "PKI present in $ca_dir"
    # A PKI made by an earlier version: its operator provisioner gets the template refusing
    # other forms of derived names (a second run changes nothing). A step-ca started before it
    # (an `up` leaves the unchanged step-ca container running) applies it once restarted: the
    # upgrade's message says so, and deploy/README.md's compose section.
    strongroom pki upgrade --dir "$ca_dir"
  else
    log "initialising the PKI (trust domain $trust_domain)"
    strongroom pki init --dir "$ca_dir" --trust-domain "$trust_domain" --dns step-ca --address :9000
  fi
  write_atomic "$pki_public/root_ca.crt" 0644 <"$ca_dir/$ca_root_in_dir"
}

# Prints the identity's SPIFFE ID, then one DNS name per line, from its compose config file.
identity_of() {
  python3 - "$config_dir/$1.yaml" <<'PY'
import os
import sys

import yaml

with open(sys.argv[1], encoding="utf-8") as f:
    identity = yaml.safe_load(f)["identity"]
print(identity["spiffe_id"])
# Production certificates never carry loopback names (every service would answer to them).
production = os.environ.get("STRONGROOM_BOOTSTRAP_MODE") == "production"
for name in identity.get("dns_names") or []:
    if not (production and name in ("localhost", "localhost.localdomain", "127.0.0.1", "::1")):
        print(name)
PY
}

mint_token() {
  local name=$1 out spiffe_id
  local -a lines dns_args=()
  out="$token_root/$name/$name.token"
  [ -d "$token_root/$name" ] || { log "no token volume mounted for $name"; return 1; }
  mapfile -t lines < <(identity_of "$name")
  spiffe_id=${lines[0]}
  for dns in "${lines[@]:1}"; do dns_args+=(--dns "$dns"); done
  strongroom pki token --dir "$ca_dir" --identity "$spiffe_id" "${dns_args[@]}" --lifetime "$lifetime" \
    | write_atomic "$out"
  [ -s "$out" ] || { log "empty token for $name"; return 1; }
  log "minted a one-time token for $spiffe_id (valid $lifetime)"
}

init_broker_secrets() {
  if [ ! -s "$secrets_dir/hsm-pin" ]; then
    head -c 24 /dev/urandom | base64 | tr -d '\n' | write_atomic "$secrets_dir/hsm-pin"
    log "generated the HSM user PIN"
  fi
  if [ ! -s "$secrets_dir/nonce-key" ]; then
    head -c 32 /dev/urandom | write_atomic "$secrets_dir/nonce-key"
    log "generated the nonce key"
  fi
  local name
  for name in audit-key release-signing-key; do
    if [ ! -s "$secrets_dir/$name" ]; then
      python3 - "$secrets_dir" "$name" <<'PY'
import os
import sys

from strongroom.keybroker.audit import new_signing_key

private_pem, public_pem = new_signing_key()
name = sys.argv[2]
for file, data, mode in ((f"{name}.pub.pem", public_pem, 0o644), (name, private_pem, 0o600)):
    path = os.path.join(sys.argv[1], file)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path + ".tmp", mode)
    os.replace(path + ".tmp", path)
PY
      log "generated the $name (Ed25519) and its public half"
    fi
  done
  # Inference verifies the broker's release answers with a certificate over the release-signing
  # key, published beside the root certificate on the volume every service reads (never the
  # broker's secrets volume): it trusts the key only within the certificate's dates, so a retired
  # key stops being trusted without anyone editing a configuration. Kept while it certifies the
  # current key for more than 60 days (half its validity, if less), else made again (backdated 5
  # minutes for clock skew).
  python3 -m strongroom.attestation.release_certificate --key "$secrets_dir/release-signing-key" \
    --out "$pki_public/release-signing-key.crt.pem" --days "$release_cert_days"
  # The bare public key published before certificates: trusted for ever by an inference that
  # still lists it, and no longer refreshed. Gone, so that such a configuration fails at start
  # naming the file (README, upgrade item 32) rather than trusting a stale key.
  if [ -e "$pki_public/release-signing-key.pub.pem" ]; then
    rm -f "$pki_public/release-signing-key.pub.pem"
    log "removed the bare release-signing public key from pki-public (inference lists release-signing-key.crt.pem)"
  fi
}

init_simulated_tee() {
  if [ "${STRONGROOM_BOOTSTRAP_MODE:-}" = production ]; then
    # The production broker refuses the simulated chain, but its collateral would still land in the
    # broker's cache and its anti-rollback records (a simulated QE identity or TCB info newer than
    # Intel's would make the genuine one look like a rollback).
    log "production: no simulated TEE"
    return
  fi
  if [ ! -d "$simulated_tee_dir" ]; then
    log "no simulated-tee volume mounted; skipping the simulated TEE"
  elif [ -s "$simulated_tee_dir/amd_trust.pem" ]; then
    log "simulated TEE chain present"
  else
    python3 -c 'import sys
from strongroom.dev.simulated import SimulatedAuthority
SimulatedAuthority.generate().save(sys.argv[1])' "$simulated_tee_dir"
    log "generated the simulated TEE chain (DEVELOPMENT ONLY)"
  fi
  if [ -d "$simulated_tee_dir" ] && [ -d "$collateral_dir" ]; then
    # The broker judges the simulated chain with simulated collateral (CRLs, TDX TCB info, QE
    # identity) from its own collateral cache, like real collateral; refreshed on every bootstrap.
    python3 -c 'import sys
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.dev.simulated import SimulatedAuthority
a = SimulatedAuthority.load(sys.argv[1])
a.fill_cache(CollateralCache(__import__("pathlib").Path(sys.argv[2]), a.trust_store()), tdx=[a.tdx()])' \
      "$simulated_tee_dir" "$collateral_dir"
    log "filled the broker's collateral cache with the simulated chain's collateral (DEVELOPMENT ONLY)"
  fi
}

init_dev_hsm() {
  local so_pin rc=0
  mkdir -p "$hsm_dir/tokens"
  so_pin=$(mktemp /tmp/so-pin.XXXXXX)
  head -c 24 /dev/urandom | base64 | tr -d '\n' >"$so_pin"
  softhsm-init-token --module "$hsm_module" --label "$hsm_label" \
    --pin-file "$secrets_dir/hsm-pin" --so-pin-file "$so_pin" >&2 || rc=$?
  rm -f "$so_pin"
  return "$rc"
}

case "${1:-all}" in
  all)
    init_pki
    for name in "${services[@]}" "${clients[@]}"; do mint_token "$name"; done
    init_broker_secrets
    init_dev_hsm
    init_simulated_tee
    log "done"
    ;;
  token)
    shift
    [ $# -gt 0 ] || { echo "usage: $0 token NAME..." >&2; exit 2; }
    for name in "$@"; do mint_token "$name"; done
    ;;
  *)
    echo "usage: $0 [all | token NAME...]" >&2
    exit 2
    ;;
esac
