#!/usr/bin/env bash
# Builds the Wasm modules of the repository for both guest targets and copies
# them to target/wasm-fixtures/<target>/<name>.wasm (names use '-' as in the
# crate folders). Idempotent: cargo skips what is up to date.
#
#   scripts/build-wasm.sh            # both targets
#   WASM_TARGETS=wasm32-wasip1 scripts/build-wasm.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
targets="${WASM_TARGETS:-wasm32-wasip1 wasm32-unknown-unknown}"
out="$root/target/wasm-fixtures"

installed="$(rustup target list --installed 2>/dev/null || true)"
for t in $targets; do
  if ! grep -qx "$t" <<<"$installed"; then
    rustup target add "$t"
  fi
done

# --- compatibility fixtures (tests/wasm): community proxy-wasm crate --------
for t in $targets; do
  cargo build --quiet --release \
    --manifest-path "$root/tests/wasm/Cargo.toml" \
    --target "$t" --target-dir "$root/target" --workspace
  mkdir -p "$out/$t"
  for dir in "$root"/tests/wasm/*/; do
    name="$(basename "$dir")"
    [ -f "$dir/Cargo.toml" ] || continue
    src="$root/target/$t/release/fixture_${name//-/_}.wasm"
    if [ -f "$src" ]; then
      cp -f "$src" "$out/$t/$name.wasm"
    else
      echo "build-wasm: missing $src" >&2
      exit 1
    fi
  done
done

# --- built-in filters (filters/*) --------------------------------------------
# (SDK helper: add the filters/ crates here, for wasm32-wasip1.)
# --- end built-in filters -----------------------------------------------------

echo "wasm modules in $out"
