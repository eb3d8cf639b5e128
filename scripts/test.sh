#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing
# (Debian tools, Rust targets), builds the Wasm modules from source, checks
# formatting and lints, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian tools the tests drive as real clients.
missing=()
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}"
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
