#!/usr/bin/env bash
# Init container of every Strongroom service pod; runs as uid 10001 before the service starts.
#
# 1. COPY_FILES="SRC=DEST ...": the kubelet mounts Secret files root-owned and group-readable (0440
#    with fsGroup); the services accept only private secret files. Each SRC is copied to DEST (a
#    memory-backed emptyDir) as a 0600 file owned by the service user.
# 2. Mints the pod's one-time enrolment token into TOKEN_FILE: the provisioner files
#    (PROVISIONER_FILES="KEY=PATH ..." under PROVISIONER_SRC) are copied into a private temporary
#    directory laid out as `strongroom pki token --dir` expects, the token is minted offline for
#    TOKEN_SPIFFE_ID with the DNS names TOKEN_DNS, and the copy is deleted. The Secret is the
#    service's own (pki.provisionerSecrets.<service>): its provisioner issues only this identity.
#    It is mounted in this init container only, never in the service container.
# Nothing secret is printed or passed on a command line.
set -euo pipefail
umask 077

for pair in ${COPY_FILES:-}; do
  install -D -m 0600 "${pair%%=*}" "${pair#*=}"
done

if [ -n "${TOKEN_FILE:-}" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  for pair in ${PROVISIONER_FILES:?}; do
    install -D -m 0600 "${PROVISIONER_SRC:?}/${pair%%=*}" "$work/${pair#*=}"
  done
  dns_args=()
  for name in ${TOKEN_DNS:-}; do
    dns_args+=(--dns "$name")
  done
  strongroom pki token --dir "$work" --identity "${TOKEN_SPIFFE_ID:?}" "${dns_args[@]}" \
    --lifetime "${TOKEN_LIFETIME:?}" >"$TOKEN_FILE.tmp"
  [ -s "$TOKEN_FILE.tmp" ] || { echo "pod-init: empty enrolment token" >&2; exit 1; }
  mv -f "$TOKEN_FILE.tmp" "$TOKEN_FILE"
  echo "pod-init: enrolment token ready for $TOKEN_SPIFFE_ID" >&2
fi
