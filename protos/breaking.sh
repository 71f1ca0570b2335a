#!/usr/bin/env bash
# `buf breaking` against the protos on main (or $BUF_AGAINST_REF). Skipped, with a message, when the
# checkout has no such ref yet (the first commit).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ref=${BUF_AGAINST_REF:-main}
buf="$root/.build/tools/node_modules/.bin/buf"
cd "$root"
if ! git rev-parse --verify -q "$ref:protos" >/dev/null; then
  echo "buf breaking: no '$ref:protos' to compare against; skipped"
  exit 0
fi
"$buf" breaking protos --against "$root/.git#ref=$ref,subdir=protos"
echo "buf breaking: no breaking changes against $ref"
