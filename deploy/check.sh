#!/usr/bin/env bash
# Offline checks of the deploy files; one summary line per check, exit status non-zero if any fails.
#
#   deploy/check.sh            (from anywhere; tools come from .build/tools and .venv, see deploy/dev/setup.sh)
#
#  1. docker-compose config -q on the compose stack (and with the confidential-VM override)
#  2. helm lint --strict and helm template for the minimal, development and production values, and
#     production with inference autoscaling (the bare defaults must be REFUSED: they leave open
#     where the broker's collateral comes from; and production without the chart's network
#     policies, unless acknowledged as externally enforced)
#  3. kubernetes-validate --strict on every rendered manifest (Kubernetes $KUBE_VERSION schemas, offline)
#  4. every values file under deploy/helm/tests/ must be REJECTED by values.schema.json, with the
#     error its "# expect:" line names; or, with a "# refused-at-render:" line instead (what a
#     draft-07 schema cannot say, such as one value above another), refused by the chart while it
#     renders the file on top of values-minimal.yaml, with that message
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

KUBE_VERSION=${KUBE_VERSION:-1.31.0}
HELM=${HELM:-$root/.build/tools/helm/helm}
KUBE_VALIDATE=${KUBE_VALIDATE:-$root/.venv/bin/kubernetes-validate}
COMPOSE=${COMPOSE:-docker-compose}
chart=deploy/helm/strongroom
compose_dir=deploy/compose

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
checks=0

# check NAME COMMAND...: runs the command, prints "ok|FAIL  NAME", shows the output only on failure.
check() {
  local name=$1
  shift
  checks=$((checks + 1))
  if "$@" >"$work/out" 2>&1; then
    printf 'ok    %s\n' "$name"
  else
    failures=$((failures + 1))
    printf 'FAIL  %s\n' "$name"
    sed 's/^/      /' "$work/out" | head -40
  fi
}

# Missing tools are failures, not skips: `make test` must not pass by checking nothing.
require() {
  command -v "$1" >/dev/null 2>&1 || [ -x "$1" ] || {
    printf 'FAIL  tool %s not found (run deploy/dev/setup.sh)\n' "$1"
    exit 1
  }
}
require "$HELM"
require "$KUBE_VALIDATE"
require "$COMPOSE"

check "compose: docker-compose config -q ($compose_dir/docker-compose.yml)" \
  "$COMPOSE" -f "$compose_dir/docker-compose.yml" config -q
check "compose: docker-compose config -q (+ docker-compose.confidential.yml)" \
  "$COMPOSE" -f "$compose_dir/docker-compose.yml" -f "$compose_dir/docker-compose.confidential.yml" config -q
check "compose: bootstrap.sh parses (bash -n)" bash -n "$compose_dir/bootstrap.sh"

template_to() { # template_to OUT [helm args...]
  local out=$1
  shift
  "$HELM" template strongroom "$chart" --namespace strongroom --kube-version "$KUBE_VERSION" "$@" >"$out"
}

render() { # render NAME [helm args...]: lint, template, kubernetes-validate
  local name=$1
  shift
  check "helm lint --strict ($name)" "$HELM" lint "$chart" --strict --kube-version "$KUBE_VERSION" "$@"
  check "helm template ($name)" template_to "$work/$name.yaml" "$@"
  check "kubernetes-validate --strict, k8s $KUBE_VERSION ($name)" \
    "$KUBE_VALIDATE" --strict --quiet -k "$KUBE_VERSION" "$work/$name.yaml"
}
render minimal -f deploy/helm/values-minimal.yaml
render development -f deploy/helm/values-development.yaml
render production -f deploy/helm/values-production.yaml
# The production values with the inference fleet under an HPA (inference.autoscaling).
render production-autoscaled -f deploy/helm/values-production.yaml \
  --set inference.autoscaling.enabled=true --set inference.autoscaling.maxReplicas=20

refused_at_render() { # refused_at_render EXPECT [helm args...]: helm must fail while rendering, for that reason
  local expect=$1 out="$work/refused.out"
  shift
  if template_to /dev/null "$@" 2>"$out"; then
    echo "helm rendered values it must refuse: $*"
    return 1
  fi
  grep -qF -- "$expect" "$out" || { cat "$out"; echo "expected: $expect"; return 1; }
}
check "helm refuses the bare defaults (no collateral egress: every release COLLATERAL_MISSING)" \
  refused_at_render "keybroker.collateral: the broker fetches attestation collateral"
check "helm refuses production without network policies unless externally enforced" \
  refused_at_render "networkPolicy.enabled is false in production mode" \
  -f deploy/helm/values-minimal.yaml --set networkPolicy.enabled=false

rejected() { # rejected FILE EXPECT: helm must fail on the schema, for the stated reason
  local out="$work/rejected.out"
  if template_to /dev/null -f "$1" 2>"$out"; then
    echo "helm accepted invalid values $1"
    return 1
  fi
  grep -q "values don.t meet the specifications of the schema" "$out" \
    || { cat "$out"; echo "helm failed, but not on the schema"; return 1; }
  [ -z "$2" ] || grep -qF -- "$2" "$out" || { cat "$out"; echo "expected: $2"; return 1; }
}
for f in deploy/helm/tests/*.yaml; do
  at_render=$(sed -n 's/^# refused-at-render: //p' "$f" | head -1)
  if [ -n "$at_render" ]; then
    check "helm refuses $(basename "$f") ($at_render)" \
      refused_at_render "$at_render" -f deploy/helm/values-minimal.yaml -f "$f"
    continue
  fi
  expect=$(sed -n 's/^# expect: //p' "$f" | head -1)
  check "schema rejects $(basename "$f")${expect:+ ($expect)}" rejected "$f" "$expect"
done

if [ "$failures" -ne 0 ]; then
  printf 'deploy/check.sh: %d of %d checks FAILED\n' "$failures" "$checks"
  exit 1
fi
printf 'deploy/check.sh: all %d checks passed\n' "$checks"
