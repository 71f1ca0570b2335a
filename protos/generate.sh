#!/usr/bin/env bash
# Generates Python code, gRPC stubs and mypy stubs from protos/ into protos/_gen (git-ignored).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
py="$root/.venv/bin/python"
out="$here/_gen"
stamp="$out/.stamp"
hash=$(cd "$here" && find strongroom -name '*.proto' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
  exit 0
fi
rm -rf "$out"
mkdir -p "$out"
include=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
mapfile -d '' protos < <(cd "$here" && find strongroom -name '*.proto' -print0 | sort -z)
(cd "$here" && "$py" -m grpc_tools.protoc -I. -I"$include" \
  --plugin=protoc-gen-mypy="$root/.venv/bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$root/.venv/bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  "${protos[@]}")
find "$out/strongroom" -type d -exec touch {}/py.typed \;
echo "$hash" >"$stamp"
echo "protos: generated ${#protos[@]} files into $out"
