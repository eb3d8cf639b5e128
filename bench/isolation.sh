#!/usr/bin/env bash
# Cost of per-stream filter instances against one VM per filter per worker,
# side by side in alternating rounds: two wasp binaries (OLD, default
# target/wasp-base: a release build of the commit before isolation; NEW,
# default target/release/wasp), WORKERS=2, CONNS=32, 1 and 4 pass-through
# `noop` filters, and the empty chain (0) as the baseline. Per cell: req/s (wrk), proxy CPU us/request (utime+stime
# of the wasp process over the run / requests), RSS after the run and peak.
# Then the recovery time after a trap: `isolation` fixture, one worker; a
# request with `x-trap: 1`, then clean requests back to back until one comes
# back through the filter (`x-filtered: 1`); median of 20.
#
#   OLD=path/to/old/wasp bench/isolation.sh      # ROUNDS=2 DURATION=5s
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-2}
ROUNDS=${ROUNDS:-2}
. bench/common.sh bench-isolation
OLD=${OLD:-$root/target/wasp-base}
NEW=${NEW:-$root/target/release/wasp}
mkdir -p "$out/filters.d"
cargo build -q --release -p demo-app
cp -f target/wasm-fixtures/wasm32-wasip1/noop.wasm "$out/filters.d/noop.wasm"
cp -f target/wasm-fixtures/wasm32-wasip1/isolation.wasm "$out/filters.d/isolation.wasm"
UP=127.0.0.1:18280

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
DEMO_THREADS=1 "$root/target/release/demo-app" upstream "$UP" 2>/dev/null & pids+=($!)

declare -A addr pid
i=0
for which in old new; do
  for n in 0 1 4; do
    i=$((i + 1)); port=$((18280 + i)); admin=$((18290 + i)); key="$which-$n"
    pipeline=$(python3 -c "print(', '.join('\"noop%d\"' % i for i in range($n)))")
    {
      echo "[proxy]"; echo "workers = $WORKERS"; echo "filters_dir = \"filters.d\""
      echo "[admin]"; echo "bind = \"127.0.0.1:$admin\""
      echo "[log]"; echo "level = \"warn\""
      for f in 0 1 2 3; do echo "[filters.noop$f]"; echo "module = \"noop.wasm\""; done
      echo "[[listeners]]"; echo "name = \"bench\""; echo "bind = \"127.0.0.1:$port\""; echo "pipeline = [$pipeline]"
      echo "  [[listeners.routes]]"; echo "  cluster = \"upstream\""
      echo "[clusters.upstream]"; echo "endpoints = [\"$UP\"]"
    } > "$out/wasp-$key.toml"
    bin=$OLD; [ "$which" = new ] && bin=$NEW
    "$bin" run --config "$out/wasp-$key.toml" 2>"$out/wasp-$key.log" & pid[$key]=$!; pids+=($!)
    addr[$key]=127.0.0.1:$port
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.1; done
  done
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
results="$out/results.tsv"; : > "$results"
for round in $(seq "$ROUNDS"); do
  for key in old-0 new-0 old-1 new-1 old-4 new-4; do
    p=${pid[$key]}
    before=$(cpu_ticks "$p")
    wrk -t2 -c"$CONNS" -d"$DURATION" "http://${addr[$key]}/bench" > "$out/wrk-$key-$round.txt"
    after=$(cpu_ticks "$p")
    rss=$(awk '/VmRSS/{print $2}' "/proc/$p/status")
    hwm=$(awk '/VmHWM/{print $2}' "/proc/$p/status")
    python3 - "$out/wrk-$key-$round.txt" "$key" "$before" "$after" "$rss" "$hwm" "$(getconf CLK_TCK)" >> "$results" <<'PY'
import sys
from bench.wrk import parse
f, key, b, a, rss, hwm, hz = sys.argv[1:]
w = parse(f)
n = w["requests"]
us = (int(a) - int(b)) / int(hz) * 1e6 / max(n, 1)
err = w["error"] or "none"
print(f"{key}\t{w['rps']:.0f}\t{us:.1f}\t{int(rss)/1024:.1f}\t{int(hwm)/1024:.1f}\t{err}")
PY
  done
done

python3 - "$results" "$WORKERS" "$CONNS" <<'PY'
import sys, statistics
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
by = {}
errors = {}
for k, rps, us, rss, hwm, err in rows:
    by.setdefault(k, []).append((float(rps), float(us), float(rss), float(hwm)))
    if err != "none":
        errors.setdefault(k, set()).add(err)
print(f"\nworkers={sys.argv[2]}, {sys.argv[3]} connections, medians over rounds\n")
print("| design | filters | req/s | proxy CPU us/req | RSS MiB | peak RSS MiB | errors |\n|---|---|---|---|---|---|---|")
for n in ["0", "1", "4"]:
    for which, name in [("old", "one VM per filter per worker"), ("new", "per-stream instances")]:
        v = by[f"{which}-{n}"]
        med = [statistics.median(x[i] for x in v) for i in range(4)]
        errs = ", ".join(sorted(errors.get(f"{which}-{n}", []))) or "none"
        print(f"| {name} | {n} | {med[0]:.0f} | {med[1]:.1f} | {med[2]:.1f} | {med[3]:.1f} | {errs} |")
PY

# --- recovery after a trap ---------------------------------------------------
for which in old new; do
  bin=$OLD; port=18303; admin=18313
  [ "$which" = new ] && bin=$NEW && port=18304 && admin=18314
  {
    echo "[proxy]"; echo "workers = 1"; echo "filters_dir = \"filters.d\""
    echo "[admin]"; echo "bind = \"127.0.0.1:$admin\""
    echo "[log]"; echo "level = \"error\""
    echo "[filters.iso]"; echo "module = \"isolation.wasm\""
    echo "[[listeners]]"; echo "name = \"bench\""; echo "bind = \"127.0.0.1:$port\""; echo "pipeline = [\"iso\"]"
    echo "  [[listeners.routes]]"; echo "  cluster = \"upstream\""
    echo "[clusters.upstream]"; echo "endpoints = [\"$UP\"]"
  } > "$out/recovery-$which.toml"
  "$bin" run --config "$out/recovery-$which.toml" 2>"$out/recovery-$which.log" & rp=$!; pids+=($rp)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.1; done
  python3 - "$port" "$which" <<'PY'
import http.client, sys, time, statistics
port, which = int(sys.argv[1]), sys.argv[2]
def get(trap):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/r", headers={"x-trap": "1"} if trap else {})
    r = c.getresponse(); r.read(); c.close()
    return r.status, r.getheader("x-filtered")
for _ in range(20): get(False)
times, failed = [], 0
for _ in range(20):
    get(True)
    t0 = time.perf_counter()
    while True:
        s, f = get(False)
        if s == 200 and f == "1":
            break
        failed += 1
    times.append((time.perf_counter() - t0) * 1e3)
    time.sleep(0.05)
print(f"recovery after a trap ({which}): median {statistics.median(times):.2f} ms, max {max(times):.2f} ms to the next request served through the filter; {failed} clean requests failed or skipped meanwhile")
PY
  kill "$rp" 2>/dev/null || true
done
