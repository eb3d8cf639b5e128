#!/usr/bin/env bash
# The background tier-up (`[proxy] wasm_compiler = "auto"`, filter/engine.rs)
# against Winch only: per module and chain length (one worker, N filters of
# the same module), with an empty module cache (a cold compile) and again
# with a warm one (a restart: the Cranelift artefact comes from disk):
#   - tier_up_ms: what /filters reports per filter (compile or cache load,
#     link, one validation instance), the largest of the chain;
#   - all tiered: from /ready until /filters shows no tier-up pending
#     (polled every 10 ms, so +-10 ms);
#   - peak RSS (VmHWM) and RSS after REQUESTS sequential keep-alive GETs
#     through the chain, once every tier-up is done.
#
#   bench/tierup.sh                       # target/release/wasp
#   WASP=path/to/wasp MODULES="add-headers router" CHAINS="1 4" bench/tierup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
WASP=${WASP:-$root/target/release/wasp}
REQUESTS=${REQUESTS:-1000}
MODULES=${MODULES:-"add-headers router"}
CHAINS=${CHAINS:-"1 4"}
out="$root/target/bench-tierup"
rm -rf "$out"
mkdir -p "$out/filters.d"
for m in $MODULES; do
  for f in "target/wasm-fixtures/wasm32-wasip1/$m.wasm" "target/filters/${m//-/_}.wasm"; do
    [ -f "$f" ] && cp "$f" "$out/filters.d/$m.wasm" && break
  done
  [ -f "$out/filters.d/$m.wasm" ] || { echo "no module $m (scripts/build-wasm.sh)" >&2; exit 1; }
done
[ -x "$root/target/release/demo-app" ] || cargo build -q --release -p demo-app

UP=127.0.0.1:18480
PORT=18481
ADMIN=127.0.0.1:18491
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
DEMO_THREADS=1 "$root/target/release/demo-app" upstream "$UP" 2>/dev/null & pids+=($!)

now_ms() { date +%s%3N; }

# run COMPILER MODULE N LABEL -> one result row (cache: $out/cache)
run() {
  local compiler=$1 module=$2 n=$3 label=$4 cache=cache cfg="$out/wasp.toml"
  {
    echo "[proxy]"; echo "workers = 1"; echo "wasm_compiler = \"$compiler\""
    echo "filters_dir = \"$out/filters.d\""; echo "module_cache = \"$out/$cache\""
    echo "[admin]"; echo "bind = \"$ADMIN\""
    echo "[log]"; echo "level = \"warn\""
    for i in $(seq 0 $((n - 1))); do
      echo "[filters.f$i]"; echo "module = \"$module.wasm\""
    done
    echo "[[listeners]]"; echo "name = \"bench\""; echo "bind = \"127.0.0.1:$PORT\""
    echo "pipeline = [$(seq 0 $((n - 1)) | sed 's/.*/"f&"/' | paste -sd, -)]"
    echo "  [[listeners.routes]]"; echo "  cluster = \"upstream\""
    echo "[clusters.upstream]"; echo "endpoints = [\"$UP\"]"
  } > "$cfg"
  "$WASP" run --config "$cfg" 2>"$out/wasp.log" & local pid=$!
  pids+=($pid)
  local ready=""
  for _ in $(seq 2000); do
    curl -fs "http://$ADMIN/ready" >/dev/null && { ready=$(now_ms); break; }
    sleep 0.01
  done
  [ -n "$ready" ] || { echo "wasp did not start; see $out/wasp.log" >&2; exit 1; }
  local done_at=""
  for _ in $(seq 6000); do
    curl -fs "http://$ADMIN/filters" | grep -q '"tier_up": "pending"' || { done_at=$(now_ms); break; }
    sleep 0.01
  done
  python3 "$root/bench/seq_client.py" "127.0.0.1:$PORT" "$REQUESTS" /bench
  local status tier hwm rss
  status=$(curl -fs "http://$ADMIN/filters")
  tier=$(python3 -c 'import json,sys; l=json.load(sys.stdin); print(max((f.get("tier_up_ms") or 0) for f in l), ",".join(sorted({f["compiler"] for f in l})))' <<<"$status")
  hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  printf '| %s | %s | %s | %s | %s | %s | %s | %.1f | %.1f |\n' "$compiler" "$module" "$n" "$label" \
    "${tier#* }" "${tier%% *}" "$((done_at - ready))" "$(echo "$hwm/1024" | bc -l)" "$(echo "$rss/1024" | bc -l)"
}

echo "| wasm_compiler | module | filters | module cache | serving | tier_up_ms (max) | all tiered after (ms) | peak RSS (MiB) | RSS after (MiB) |"
echo "|---|---|--:|---|---|--:|--:|--:|--:|"
for m in $MODULES; do
  for n in $CHAINS; do
    for c in winch auto; do
      rm -rf "$out/cache"
      run "$c" "$m" "$n" cold
      run "$c" "$m" "$n" warm   # a restart: the same cache again
    done
  done
done
