#!/usr/bin/env bash
# Filter-chain overhead, end to end on loopback: the upstream directly, and
# wasp with an empty pipeline, 1 and 4 pass-through Wasm filters (the
# `noop` fixture, built with the community proxy-wasm crate), measured side
# by side in alternating rounds with wrk. Bounded: ROUNDS x 4 x DURATION.
#
#   bench/filters.sh                 # ROUNDS=3 DURATION=5s CONNS=32 WORKERS=1
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh bench-filters
mkdir -p "$out/filters.d"

cargo build -q --release -p wasp -p demo-app
# No AssemblyScript module is measured here: no need for node and npm.
WASP_BUILD_FIXTURES=1 WASP_BUILD_ASSEMBLYSCRIPT=0 WASM_TARGETS=wasm32-wasip1 ./scripts/build-wasm.sh >/dev/null
cp -f target/wasm-fixtures/wasm32-wasip1/noop.wasm "$out/filters.d/noop.wasm"
bin="$root/target/release"
UP=127.0.0.1:18180

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
DEMO_THREADS=1 "$bin/demo-app" upstream "$UP" 2>/dev/null & pids+=($!)

declare -A addr pid
for n in 0 1 4; do
  port=$((18181 + n)); admin=$((18191 + n))
  pipeline=$(python3 -c "print(', '.join('\"noop%d\"' % i for i in range($n)))")
  {
    echo "[proxy]"; echo "workers = $WORKERS"; echo "filters_dir = \"filters.d\""
    echo "[admin]"; echo "bind = \"127.0.0.1:$admin\""
    echo "[log]"; echo "level = \"warn\""
    for i in 0 1 2 3; do echo "[filters.noop$i]"; echo "module = \"noop.wasm\""; done
    echo "[[listeners]]"; echo "name = \"bench\""; echo "bind = \"127.0.0.1:$port\""; echo "pipeline = [$pipeline]"
    echo "  [[listeners.routes]]"; echo "  cluster = \"upstream\""
    echo "[clusters.upstream]"; echo "endpoints = [\"$UP\"]"
  } > "$out/wasp-$n.toml"
  "$bin/wasp" run --config "$out/wasp-$n.toml" 2>"$out/wasp-$n.log" & pid[$n]=$!; pids+=($!)
  addr[$n]=127.0.0.1:$port
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.1; done
done

results="$out/results.tsv"; : > "$results"
for round in $(seq "$ROUNDS"); do
  for target in direct 0 1 4; do
    a=${addr[$target]:-$UP}
    wrk -t1 -c"$CONNS" -d"$DURATION" --latency "http://$a/bench" > "$out/wrk-$target-$round.txt"
    python3 - "$out/wrk-$target-$round.txt" "$target" >> "$results" <<'PY'
import sys
from bench.wrk import parse
w = parse(sys.argv[1])
err = "non2xx" if w["non2xx"] is not None else ""
print(f"{sys.argv[2]}\t{w['rps']:.0f}\t{w['p99']:.3f}\t{err}")
PY
  done
done
rss() { awk '/VmHWM/{print $2}' "/proc/$1/status"; }
python3 - "$results" "$(rss "${pid[0]}")" "$(rss "${pid[1]}")" "$(rss "${pid[4]}")" "$WORKERS" <<'PY'
import sys, statistics
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
by = {}
for t, rps, p99, err in rows:
    by.setdefault(t, []).append((float(rps), float(p99), err))
hwm = dict(zip(["0", "1", "4"], sys.argv[2:5]))
print(f"\nwasp workers={sys.argv[5]}; medians over rounds\n")
print("| target | req/s | p99 ms | peak RSS MiB | errors |\n|---|---|---|---|---|")
med = {}
for t in ["direct", "0", "1", "4"]:
    v = by[t]
    med[t] = (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
    name = "upstream direct" if t == "direct" else f"wasp, {t} filter(s)"
    rss = f"{int(hwm[t])/1024:.1f}" if t in hwm else "-"
    errs = ",".join(sorted({x[2] for x in v if x[2]})) or "none"
    print(f"| {name} | {med[t][0]:.0f} | {med[t][1]:.3f} | {rss} | {errs} |")
print(f"\nthroughput ratio 4 filters / empty pipeline: {med['4'][0]/med['0'][0]:.2f}; 1 filter / empty: {med['1'][0]/med['0'][0]:.2f}")
per_req = lambda n: (1/med[n][0] - 1/med['0'][0]) * 1e6
print(f"added time per request (1/throughput difference, single worker): 1 filter {per_req('1'):.1f} us, 4 filters {per_req('4'):.1f} us ({per_req('4')/4:.1f} us per filter)")
PY
