#!/usr/bin/env bash
# Builds step-ca 0.19 from Debian's packaged Go source (golang-github-smallstep-certificates-dev),
# offline, in GOPATH mode, with the small main package beside this script.
#
#   pki/step-ca/build.sh OUT_PATH
#
# Idempotent: when OUT_PATH exists and the hash of the build inputs (this script, main.go, the Go
# toolchain version and the installed versions of the Debian source packages) is unchanged, it does
# nothing. The hash is kept in OUT_PATH.inputs.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_PATH" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$1
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac

command -v go >/dev/null || { echo "build.sh: 'go' not found (install Debian package golang-go)" >&2; exit 1; }
src=/usr/share/gocode/src/github.com/smallstep/certificates
[ -d "$src/commands" ] || {
  echo "build.sh: $src missing (install Debian package golang-github-smallstep-certificates-dev)" >&2
  exit 1
}

# Everything that changes the binary: our sources, the toolchain and every packaged Go library.
inputs_hash=$(
  {
    cat "$here/build.sh" "$here/main.go"
    go version
    dpkg-query -W -f='${Package} ${Version}\n' 'golang-*' 2>/dev/null | sort
  } | sha256sum | cut -c1-32
)
stamp="$out.inputs"
if [ -x "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs_hash" ]; then
  exit 0
fi

build="$root/.build/stepca"
gopath="$build/gopath"
pkgdir="$gopath/src/strongroom.dev/step-ca"
mkdir -p "$pkgdir" "$build/cache" "$(dirname "$out")"
cp "$here/main.go" "$pkgdir/main.go"

echo "build.sh: building step-ca into $out" >&2
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# CGO is off: the result is a static binary that needs no C toolchain (badger falls back to pure Go).
(
  cd "$pkgdir"
  env GO111MODULE=off GOFLAGS= GOPROXY=off CGO_ENABLED=0 \
    GOPATH="$gopath:/usr/share/gocode" GOCACHE="$build/cache" \
    go build -trimpath -ldflags='-s -w' -o "$tmp" .
)
"$tmp" --version >/dev/null
mv -f "$tmp" "$out"
trap - EXIT
echo "$inputs_hash" >"$stamp"
