#!/usr/bin/env bash
# `buf breaking` against protos/api-baseline.json: the API as last released, a buf image kept in the
# repository. A clean clone of main compares against it as well as a branch does, so CI catches a
# breaking change (comparing against the `main` ref could not: there, main is the checkout itself).
# `protos/breaking.sh --update` rewrites the baseline: an explicit, reviewed act, done when an API
# version is released (additive changes pass against the older baseline without it).
# PROTOS_DIR checks another copy of the protos against the same baseline (the tests use it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
buf="$root/.build/tools/node_modules/.bin/buf"
protos=${PROTOS_DIR:-$root/protos}
baseline="$root/protos/api-baseline.json"
if [ "${1:-}" = "--update" ]; then
  (cd "$protos" && "$buf" build --exclude-source-info -o "$baseline.tmp.json")
  python3 -m json.tool --indent 1 "$baseline.tmp.json" > "$baseline"
  rm -f "$baseline.tmp.json"
  echo "buf breaking: baseline rewritten ($baseline)"
  exit 0
fi
cd "$protos"
"$buf" breaking . --against "$baseline"
echo "buf breaking: no breaking changes against protos/api-baseline.json"
