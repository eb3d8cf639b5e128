#!/usr/bin/env bash
# Tracing overhead, end to end on loopback: wasp without [tracing], wasp
# with tracing on but nothing sampled (sample_ratio = 0: the request-path
# hooks, ids and trace headers, no export), and wasp exporting every
# request's two spans (100% sampling) over OTLP/gRPC to a real receiver
# (bench/otlp_sink.rs, the tests' TraceService), measured side by side in
# alternating rounds with wrk. The sink runs on the same machine, so "on"
# pays for the collector's CPU too. Bounded: ROUNDS x 3 x DURATION.
#
#   bench/tracing.sh                 # ROUNDS=3 DURATION=5s CONNS=32 WORKERS=1
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh bench-tracing

cargo build -q --release -p wasp -p demo-app
cargo build -q --release -p wasp --example otlp-sink
bin="$root/target/release"
UP=127.0.0.1:18480
SINK=127.0.0.1:18487

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
DEMO_THREADS=1 "$bin/demo-app" upstream "$UP" 2>/dev/null & pids+=($!)
"$bin/examples/otlp-sink" "$SINK" > "$out/sink.log" & pids+=($!)

declare -A addr admin
for mode in off unsampled on; do
  case $mode in
    off) port=18481; adm=18491; ratio= ;;
    unsampled) port=18483; adm=18493; ratio=0.0 ;;
    on) port=18482; adm=18492; ratio=1.0 ;;
  esac
  {
    echo "[proxy]"; echo "workers = $WORKERS"
    echo "[admin]"; echo "bind = \"127.0.0.1:$adm\""
    echo "[log]"; echo "level = \"warn\""
    if [ -n "$ratio" ]; then
      echo "[tracing]"; echo "otlp_endpoint = \"http://$SINK\""; echo "protocol = \"grpc\""
      echo "sample_ratio = $ratio"; echo "service_name = \"bench\""
    fi
    echo "[[listeners]]"; echo "name = \"bench\""; echo "bind = \"127.0.0.1:$port\""
    echo "  [[listeners.routes]]"; echo "  name = \"bench\""; echo "  cluster = \"upstream\""
    echo "[clusters.upstream]"; echo "endpoints = [\"$UP\"]"
  } > "$out/wasp-$mode.toml"
  "$bin/wasp" run --config "$out/wasp-$mode.toml" 2>"$out/wasp-$mode.log" & pids+=($!)
  addr[$mode]=127.0.0.1:$port; admin[$mode]=127.0.0.1:$adm
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$adm/ready" >/dev/null && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$adm/ready" >/dev/null || { echo "wasp ($mode) is not ready:"; cat "$out/wasp-$mode.log"; exit 1; }
done

results="$out/results.tsv"; : > "$results"
for round in $(seq "$ROUNDS"); do
  for mode in off unsampled on; do
    wrk -t1 -c"$CONNS" -d"$DURATION" --latency "http://${addr[$mode]}/bench" > "$out/wrk-$mode-$round.txt"
    python3 - "$out/wrk-$mode-$round.txt" "$mode" >> "$results" <<'PY'
import sys
from bench.wrk import parse
w = parse(sys.argv[1])
err = "non2xx" if w["non2xx"] is not None else ""
print(f"{sys.argv[2]}\t{w['rps']:.0f}\t{w['p99']:.3f}\t{w['requests']}\t{err}")
PY
  done
done
sleep 3  # the last batches leave (1 s schedule) and reach the sink
metrics=$(curl -fs "http://${admin[on]}/metrics")
metric() { echo "$metrics" | awk -v n="$1" '$1 == n {print $2}'; }
python3 - "$results" "$(tail -n1 "$out/sink.log")" "$(metric wasp_trace_spans_exported_total)" \
  "$(metric wasp_trace_export_failures_total)" "$WORKERS" "$(metric wasp_trace_spans_ended_total)" \
  "$(metric wasp_trace_spans_lost_total)" <<'PY'
import sys, statistics
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
by = {}
for m, rps, p99, reqs, err in rows:
    by.setdefault(m, []).append((float(rps), float(p99), int(reqs), err))
print(f"\nwasp workers={sys.argv[5]}; medians over rounds (wrk -c, one wrk thread)\n")
print("| tracing | req/s | p99 ms | errors |\n|---|---|---|---|")
med = {}
labels = {"off": "off (no [tracing])", "unsampled": "on, sample_ratio = 0 (nothing exported)",
          "on": "on, 100% sampled, OTLP/gRPC to the sink"}
for m in ["off", "unsampled", "on"]:
    v = by[m]
    med[m] = (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
    errs = ",".join(sorted({x[3] for x in v if x[3]})) or "none"
    label = labels[m]
    print(f"| {label} | {med[m][0]:.0f} | {med[m][1]:.3f} | {errs} |")
print(f"\nthroughput ratio on / off: {med['on'][0] / med['off'][0]:.3f}; "
      f"unsampled / off: {med['unsampled'][0] / med['off'][0]:.3f}")
per_req = lambda m: (1 / med[m][0] - 1 / med['off'][0]) * 1e6
print(f"added time per request (1/throughput difference): on {per_req('on'):.1f} us, unsampled {per_req('unsampled'):.1f} us")
expected = 2 * sum(x[2] for x in by["on"])
print(f"spans: 2 per request wrk counted: {expected}; wasp ended {sys.argv[6]}, exported {sys.argv[3]}, "
      f"lost in failed exports {sys.argv[7]} ({sys.argv[4]} failed exports), "
      f"dropped on a full queue {float(sys.argv[6]) - float(sys.argv[3]) - float(sys.argv[7]):.0f}; "
      f"sink: {sys.argv[2]}")
PY
