#!/usr/bin/env bash
# Hot reload, on loopback, release build:
#  (a) time from a module's final write (close, or rename into place) to the
#      first response carrying the new version's header, median and max over
#      SWAPS swaps, for cold compiles (a version never seen: new hash, empty
#      module cache) and cached ones (two versions compiled before, swapped
#      back and forth). Measured by the ignored `reload_latency` test
#      (tests/reload.rs) against the real binary; the module is the
#      `versioned` fixture, whose `x-module-version` header comes from a
#      marker in its data that this bench patches per version.
#  (b) throughput with wrk while the module is swapped every INTERVAL
#      seconds, against an equal run without swaps, alternating, ROUNDS
#      times each; reported as the ratio of medians (target >= 0.95).
# Bounded: about SWAPS x 0.5 s for (a), ROUNDS x 2 x DURATION for (b).
#
#   bench/reload.sh     # SWAPS=20 ROUNDS=3 DURATION=5s CONNS=32 WORKERS=1 INTERVAL=0.25 SWAP_KIND=cached
set -euo pipefail
cd "$(dirname "$0")/.."
SWAPS=${SWAPS:-20}
INTERVAL=${INTERVAL:-0.25}
SWAP_KIND=${SWAP_KIND:-cached}   # cached: two versions back and forth; cold: a new version each swap
. bench/common.sh bench-reload
rm -rf "$out"; mkdir -p "$out/filters.d"

cargo build -q --release -p wasp -p demo-app
# No AssemblyScript module is measured here: no need for node and npm.
WASP_BUILD_FIXTURES=1 WASP_BUILD_ASSEMBLYSCRIPT=0 WASM_TARGETS=wasm32-wasip1 ./scripts/build-wasm.sh >/dev/null
fixture="$root/target/wasm-fixtures/wasm32-wasip1/versioned.wasm"
bin="$root/target/release"

echo "== (a) final write -> first response from the new version ($SWAPS swaps each)"
SWAPS=$SWAPS WORKERS=$WORKERS cargo test -q --release -p wasp --test reload reload_latency -- --ignored --nocapture 2>&1 |
  grep -E '^(module|case|cold|cached)' | tee "$out/latency.tsv"

echo "== (b) throughput during swaps vs without ($SWAP_KIND swaps every ${INTERVAL}s, $ROUNDS rounds of $DURATION)"
# version N of the module: the marker's 16 characters replaced.
version() { python3 - "$fixture" "$1" "$2" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
marker = b"wasp-version:"
at = data.index(marker) + len(marker)
v = sys.argv[2].encode()
assert len(v) == 16
open(sys.argv[3], "wb").write(data[:at] + v + data[at + 16:])
PY
}
version aaaaaaaaaaaaaaaa "$out/a.wasm"
version bbbbbbbbbbbbbbbb "$out/b.wasm"
cp "$out/a.wasm" "$out/filters.d/swap.wasm"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
UP=127.0.0.1:18280; PORT=18281; ADMIN=18291
DEMO_THREADS=1 "$bin/demo-app" upstream "$UP" 2>/dev/null & pids+=($!)
cat > "$out/wasp.toml" <<EOF
[proxy]
workers = $WORKERS
filters_dir = "filters.d"
module_cache = "cache"
[admin]
bind = "127.0.0.1:$ADMIN"
[log]
level = "warn"
[filters.swap]
module = "swap.wasm"
[[listeners]]
name = "bench"
bind = "127.0.0.1:$PORT"
pipeline = ["swap"]
  [[listeners.routes]]
  cluster = "upstream"
[clusters.upstream]
endpoints = ["$UP"]
EOF
"$bin/wasp" run --config "$out/wasp.toml" 2>"$out/wasp.log" & pids+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$ADMIN/ready" >/dev/null && break; sleep 0.1; done
# Both cached versions compiled once before measuring.
for v in b a; do
  cp "$out/$v.wasm" "$out/filters.d/.swap.tmp" && mv "$out/filters.d/.swap.tmp" "$out/filters.d/swap.wasm"; sleep 0.5
done

# Swaps by rename (what deploy tools do) until the file "$1" disappears;
# $2: the round (names the prepared cold versions).
swapper() {
  local n=0
  while [ -e "$1" ]; do
    n=$((n + 1))
    if [ "$SWAP_KIND" = cold ]; then
      cp "$out/cold/$2-$n.wasm" "$out/filters.d/.swap.tmp" 2>/dev/null || break
    else
      cp "$out/$([ $((n % 2)) = 0 ] && echo a || echo b).wasm" "$out/filters.d/.swap.tmp"
    fi
    mv "$out/filters.d/.swap.tmp" "$out/filters.d/swap.wasm"
    sleep "$INTERVAL"
  done
  echo "$n" > "$1.count"
}

results="$out/results.tsv"; : > "$results"
run() { # $1: steady|swaps, $2: round
  local flag="$out/swapping-$2" pid=
  if [ "$1" = swaps ] && [ "$SWAP_KIND" = cold ]; then
    # Versions never seen, made before the run so the swapper only copies.
    mkdir -p "$out/cold"
    for n in $(seq 100); do version "$(printf 'c%07x%08x' "$2" "$n")" "$out/cold/$2-$n.wasm"; done
  fi
  if [ "$1" = swaps ]; then touch "$flag"; swapper "$flag" "$2" & pid=$!; fi
  wrk -t1 -c"$CONNS" -d"$DURATION" "http://127.0.0.1:$PORT/bench" > "$out/wrk-$1-$2.txt"
  local swaps=0
  if [ -n "$pid" ]; then rm -f "$flag"; wait "$pid"; swaps=$(cat "$flag.count"); fi
  python3 - "$out/wrk-$1-$2.txt" "$1" "$swaps" >> "$results" <<'PY'
import sys
from bench.wrk import parse
w = parse(sys.argv[1])
errs = (f"non2xx={w['non2xx']} " if w["non2xx"] is not None else "") + (w["socket_errors"] or "")
print(f"{sys.argv[2]}\t{w['rps']:.0f}\t{sys.argv[3]}\t{errs.strip() or 'none'}")
PY
}
for round in $(seq "$ROUNDS"); do
  # Alternate the order so drift (thermal, neighbours) does not favour one.
  if [ $((round % 2)) = 1 ]; then run steady "$round"; run swaps "$round"; else run swaps "$round"; run steady "$round"; fi
done
failures=$(curl -fs "http://127.0.0.1:$ADMIN/metrics" | awk '/^wasp_reload_failures_total/{print $2}')
generation=$(curl -fs "http://127.0.0.1:$ADMIN/reload" | tr -d '\n')
python3 - "$results" "$failures" "$generation" "$WORKERS" "$SWAP_KIND" "$INTERVAL" <<'PY'
import sys, statistics
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
print(f"\nwasp workers={sys.argv[4]}; {sys.argv[5]} swaps every {sys.argv[6]} s; reload failures: {sys.argv[2]}; {sys.argv[3]}\n")
print("| run | req/s per round | swaps per round | errors |\n|---|---|---|---|")
med = {}
for kind in ["steady", "swaps"]:
    v = [r for r in rows if r[0] == kind]
    med[kind] = statistics.median(float(r[1]) for r in v)
    print(f"| {kind} | {', '.join(r[1] for r in v)} | {', '.join(r[2] for r in v)} | {', '.join(sorted({r[3] for r in v}))} |")
print(f"\nthroughput during swaps / without (medians): {med['swaps'] / med['steady']:.3f}")
PY
