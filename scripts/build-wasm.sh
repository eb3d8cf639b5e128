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
# WASP_BUILD_FIXTURES=0 builds only the built-in filters (the quickstart).
[ "${WASP_BUILD_FIXTURES:-1}" = 0 ] && targets_fixtures="" || targets_fixtures="$targets"
for t in $targets_fixtures; do
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

# --- built-in filters (filters/*), written on wasp-sdk, for wasm32-wasip1 ----
filters_out="$root/target/filters"
if grep -qx wasm32-wasip1 <<<"$(rustup target list --installed 2>/dev/null || echo wasm32-wasip1)"; then
  cargo build --quiet --release --target wasm32-wasip1 \
    --manifest-path "$root/Cargo.toml" --target-dir "$root/target" \
    -p access-log -p metrics -p trace-context -p router
  mkdir -p "$filters_out"
  for f in access_log metrics trace_context router; do
    cp -f "$root/target/wasm32-wasip1/release/$f.wasm" "$filters_out/$f.wasm"
  done
  echo "built-in filters in $filters_out"
fi
# --- end built-in filters -----------------------------------------------------

# --- the AssemblyScript example filter (a second guest language), from npm ---
# A test fixture: built with the fixtures (not for WASP_BUILD_FIXTURES=0);
# WASP_BUILD_ASSEMBLYSCRIPT=0 skips it alone.
if [ "${WASP_BUILD_FIXTURES:-1}" != 0 ] && [ "${WASP_BUILD_ASSEMBLYSCRIPT:-1}" != 0 ]; then
  "$root/scripts/build-assemblyscript.sh"
fi

echo "wasm modules in $out"
