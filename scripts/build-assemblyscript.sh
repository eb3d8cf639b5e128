#!/usr/bin/env bash
# Builds the AssemblyScript example filter (examples/filters/assemblyscript)
# from its pinned npm packages (package-lock.json: assemblyscript and the
# AssemblyScript Proxy-Wasm SDK) and copies the module to
# target/wasm-fixtures/assemblyscript/as_filter.wasm for the tests.
# Idempotent: `npm ci` runs only when the lock file changed.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/examples/filters/assemblyscript"
out="$root/target/wasm-fixtures/assemblyscript"

skip="(WASP_BUILD_ASSEMBLYSCRIPT=0 skips this filter; its tests then report SKIPPED)"
# assemblyscript 0.28 needs Node.js 20 or newer; Debian's nodejs package may
# be older, and the compiler then fails with an obscure syntax error.
if ! command -v node >/dev/null; then
  echo "build-assemblyscript: node is missing: install Node.js 20 or newer (with npm) $skip" >&2
  exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
if ! [ "$node_major" -ge 20 ] 2>/dev/null; then
  echo "build-assemblyscript: node $(node --version 2>/dev/null || echo '?') is too old: assemblyscript 0.28 needs Node.js 20 or newer (e.g. from nodesource or nvm) $skip" >&2
  exit 1
fi
if ! command -v npm >/dev/null; then
  echo "build-assemblyscript: npm is missing (scripts/test.sh installs nodejs and npm) $skip" >&2
  exit 1
fi
# Test binaries may build it at once (tests/support: assemblyscript_filter).
mkdir -p "$root/target"
if command -v flock >/dev/null; then
  exec 9>"$root/target/.assemblyscript-build.lock"
  flock 9
fi
cd "$src"
stamp="node_modules/.wasp-lock"
if [ ! -f "$stamp" ] || ! cmp -s package-lock.json "$stamp"; then
  npm ci --no-audit --no-fund --loglevel=error
  cp package-lock.json "$stamp"
fi
npm run --silent build
mkdir -p "$out"
cp -f build/as_filter.wasm "$out/as_filter.wasm"
echo "assemblyscript filter in $out"
