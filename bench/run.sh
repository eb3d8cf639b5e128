#!/usr/bin/env bash
# End-to-end load benchmark on loopback: the upstream directly, wasp, and
# nginx as an equivalent reverse proxy, measured side by side in one run,
# alternating, with wrk, at saturation and paced (PACE_MS think time per
# connection, bench/paced.lua). Bounded: ROUNDS x 2 shapes x 3 targets x
# DURATION seconds.
#
#   bench/run.sh                    # defaults: 3 rounds of 5 s, 32 connections
#   ROUNDS=5 DURATION=10s CONNS=64 bench/run.sh
#   WASP_BIN=path/to/wasp bench/run.sh   # measure another build of wasp (default:
#                                        # scripts/build-release.sh, a static PIE)
#   MTLS=1 bench/run.sh             # mTLS between two sidecars vs plaintext (bench/mtls.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
# MTLS=1: the sidecar-to-sidecar mTLS hop against plaintext instead (bench/mtls.sh).
if [ "${MTLS:-0}" = 1 ]; then exec bench/mtls.sh; fi
. bench/common.sh bench nginx=nginx-light

cargo build -q --release -p demo-app
bin="$root/target/release"
# The binary as deployed (static PIE on glibc Linux), unless WASP_BIN says otherwise.
WASP_BIN=${WASP_BIN:-$("$root/scripts/build-release.sh")}

UP=127.0.0.1:18080
WASP=127.0.0.1:18081
NGINX=127.0.0.1:18082
ADMIN=127.0.0.1:18091

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

DEMO_THREADS=1 "$bin/demo-app" upstream "$UP" 2>"$out/upstream.log" & pids+=($!)

cat > "$out/wasp.toml" <<TOML
[proxy]
workers = $WORKERS
[admin]
bind = "$ADMIN"
[log]
level = "warn"
[[listeners]]
name = "bench"
bind = "$WASP"
  [[listeners.routes]]
  cluster = "upstream"
[clusters.upstream]
endpoints = ["$UP"]
TOML
"$WASP_BIN" run --config "$out/wasp.toml" 2>"$out/wasp.log" & wasp_pid=$!; pids+=($wasp_pid)

mkdir -p "$out/nginx"
cat > "$out/nginx/nginx.conf" <<NGINX
worker_processes $WORKERS;
daemon off;
pid $out/nginx/nginx.pid;
error_log $out/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server $UP; keepalive 64; }
  server {
    listen $NGINX reuseport;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
NGINX
nginx -c "$out/nginx/nginx.conf" -p "$out/nginx" 2>"$out/nginx/stderr.log" & nginx_pid=$!; pids+=($nginx_pid)

for _ in $(seq 100); do curl -fs "http://$ADMIN/ready" >/dev/null && curl -fs "http://$NGINX/bench" >/dev/null && break; sleep 0.1; done
curl -fs "http://$WASP/bench" >/dev/null || { echo "wasp is not serving; see $out/wasp.log"; exit 1; }

# nginx's worker is a child of the master; measure the workers.
nginx_workers() { pgrep -P "$nginx_pid" | tr '\n' ' '; }
# user and kernel CPU ticks, summed over the processes
cpu_ticks() { local u=0 k=0; for p in "$@"; do read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + a)); k=$((k + b)); done; echo "$u $k"; }
rss_kb() { local t=0; for p in "$@"; do t=$(( t + $(awk '/VmRSS/{print $2}' "/proc/$p/status") )); done; echo "$t"; }
hwm_kb() { local t=0; for p in "$@"; do t=$(( t + $(awk '/VmHWM/{print $2}' "/proc/$p/status") )); done; echo "$t"; }

results="$out/results.tsv"
: > "$results"
hz=$(getconf CLK_TCK)
# Two load shapes: "max" is closed-loop at each target's saturation (its
# throughput; latency then follows from Little's law), "paced" gives every
# connection a think time (bench/paced.lua) so all targets see the same
# offered load below saturation and their latencies compare like for like.
for round in $(seq "$ROUNDS"); do
  for shape in max paced; do
  for target in direct wasp nginx; do
    label=$target; script=()
    if [ "$shape" = paced ]; then label="$target paced"; script=(-s "$root/bench/paced.lua"); fi
    case $target in
      direct) addr=$UP; procs=() ;;
      wasp) addr=$WASP; procs=($wasp_pid) ;;
      nginx) addr=$NGINX; procs=($(nginx_workers)) ;;
    esac
    before="0 0"; [ ${#procs[@]} -gt 0 ] && before=$(cpu_ticks "${procs[@]}")
    wrk -t1 -c"$CONNS" -d"$DURATION" --latency "${script[@]}" "http://$addr/bench" > "$out/wrk-$target-$shape-$round.txt"
    after="0 0"; [ ${#procs[@]} -gt 0 ] && after=$(cpu_ticks "${procs[@]}")
    rss=0; [ ${#procs[@]} -gt 0 ] && rss=$(rss_kb "${procs[@]}")
    python3 - "$out/wrk-$target-$shape-$round.txt" "$label" "$round" "$before" "$after" "$hz" "$rss" >> "$results" <<'PY'
import sys
from bench.wrk import parse
w = parse(sys.argv[1])
target, rnd, hz, rss = sys.argv[2], sys.argv[3], int(sys.argv[6]), sys.argv[7]
(u0, k0), (u1, k1) = (map(int, sys.argv[4].split())), (map(int, sys.argv[5].split()))
user, kern = (u1 - u0) / hz, (k1 - k0) / hz
us = lambda secs: secs * 1e6 / w["requests"]
print(f"{target}\t{rnd}\t{w['rps']:.0f}\t{w['p50']:.3f}\t{w['p99']:.3f}\t{user + kern:.2f}\t{us(user):.1f}\t{us(kern):.1f}\t{rss}\t{w['error']}")
PY
  done
  done
done

wasp_hwm=$(hwm_kb "$wasp_pid")
python3 - "$results" "$wasp_hwm" "$CONNS" "$DURATION" "$ROUNDS" "$WORKERS" <<'PY'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
hwm, conns, dur, rounds, workers = sys.argv[2:7]
by = {}
for t, r, rps, p50, p99, cpu, user, kern, rss, err in rows:
    by.setdefault(t, []).append((float(rps), float(p50), float(p99), float(cpu), float(user), float(kern), int(rss), err))
print(f"\nwrk -t1 -c{conns} -d{dur}, {rounds} alternating rounds, {workers} proxy worker(s); medians over rounds\n")
print("| target | req/s | p50 ms | p99 ms | proxy CPU s per round | proxy user µs/req | proxy kernel µs/req | proxy RSS MiB | errors |")
print("|---|---|---|---|---|---|---|---|---|")
med = {}
for t in ["direct", "wasp", "nginx", "direct paced", "wasp paced", "nginx paced"]:
    v = by.get(t, [])
    if not v: continue
    m = [statistics.median(x[i] for x in v) for i in range(6)]
    med[t] = m
    rss = max(x[6] for x in v) / 1024
    errs = "; ".join(sorted({x[7] for x in v if x[7]})) or "none"
    print(f"| {t} | {m[0]:.0f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.2f} | {m[4]:.1f} | {m[5]:.1f} | {rss:.1f} | {errs} |")
if "wasp" in med and "nginx" in med:
    w, n = med["wasp"], med["nginx"]
    print(f"\nwasp/nginx throughput ratio: {w[0]/n[0]:.2f}  p99 ratio: {w[2]/n[2]:.2f}  wasp/direct: {w[0]/med['direct'][0]:.2f}")
if "wasp paced" in med and "nginx paced" in med:
    w, n = med["wasp paced"], med["nginx paced"]
    print(f"paced (same offered load): wasp/nginx p50 ratio: {w[1]/n[1]:.2f}  p99 ratio: {w[2]/n[2]:.2f}")
print(f"wasp peak RSS (VmHWM): {int(hwm)/1024:.1f} MiB")
PY
