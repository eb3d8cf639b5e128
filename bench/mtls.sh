#!/usr/bin/env bash
# The cost of mTLS between two sidecars, on loopback: wrk -> outbound wasp ->
# inbound wasp -> demo app, with the hop between the sidecars either
# plaintext or mTLS (certificates from `wasp certs`, identity checked).
# Four shapes, alternating rounds, wrk -t1 with keep-alive from the client:
#
#   plain-keepalive   hop over pooled plaintext connections
#   mtls-keepalive    hop over pooled mTLS connections (the mesh's normal case)
#   plain-newconn     a new TCP connection per request on the hop (pool_max_idle = 0)
#   mtls-newconn      a new mTLS handshake per request on the hop (TLS 1.3, resumption allowed)
#
#   bench/mtls.sh                          # 3 rounds of 5 s, 32 connections
#   ROUNDS=5 DURATION=10s bench/mtls.sh    # or: MTLS=1 bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh bench-mtls

cargo build -q --release -p wasp -p demo-app
bin="${CARGO_TARGET_DIR:-$root/target}/release"

rm -rf "$out/certs"
"$bin/wasp" certs --out "$out/certs" --ca-name mesh --service front,reviews >/dev/null
c="$out/certs"

UP=127.0.0.1:18180
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

DEMO_THREADS=1 "$bin/demo-app" upstream "$UP" 2>"$out/upstream.log" & pids+=($!)

# start NAME PORT ADMIN_PORT LISTENER_TLS CLUSTER_ENDPOINT CLUSTER_EXTRA
start() {
  local name=$1 port=$2 admin=$3 ltls=$4 endpoint=$5 extra=$6
  cat > "$out/$name.toml" <<TOML
[proxy]
workers = $WORKERS
[admin]
bind = "127.0.0.1:$admin"
[log]
level = "warn"
[[listeners]]
name = "$name"
bind = "127.0.0.1:$port"
$ltls
  [[listeners.routes]]
  cluster = "next"
[clusters.next]
endpoints = ["$endpoint"]
$extra
TOML
  "$bin/wasp" run --config "$out/$name.toml" 2>"$out/$name.log" & pids+=($!)
  eval "pid_$name=$!"
}

INBOUND_TLS="tls = { cert = \"$c/reviews.pem\", key = \"$c/reviews-key.pem\", client_ca = \"$c/mesh-ca.pem\", allow = [\"spiffe://mesh.local/ns/default/sa/front\"] }"
CLUSTER_TLS="tls = { ca = \"$c/mesh-ca.pem\", cert = \"$c/front.pem\", key = \"$c/front-key.pem\", expect_identity = \"spiffe://mesh.local/ns/default/sa/reviews\" }"

start in_plain 18190 18290 "" "$UP" ""
start in_mtls 18191 18291 "$INBOUND_TLS" "$UP" ""
start plain_keepalive 18100 18200 "" "127.0.0.1:18190" ""
start mtls_keepalive 18101 18201 "" "127.0.0.1:18191" "$CLUSTER_TLS"
start plain_newconn 18102 18202 "" "127.0.0.1:18190" "pool_max_idle = 0"
start mtls_newconn 18103 18203 "" "127.0.0.1:18191" "pool_max_idle = 0
$CLUSTER_TLS"

for port in 18100 18101 18102 18103; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/bench" >/dev/null && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$port/bench" >/dev/null || { echo "port $port is not serving; see $out/*.log"; exit 1; }
done

metric() { curl -fs "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 ~ "^"n {s += $2} END {print s + 0}'; }
cpu_secs() { local t=0; for p in "$@"; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat") )); done; echo "$t"; }

results="$out/results.tsv"
: > "$results"
hz=$(getconf CLK_TCK)
for round in $(seq "$ROUNDS"); do
  for shape in plain_keepalive mtls_keepalive plain_newconn mtls_newconn; do
    case $shape in
      plain_keepalive) port=18100; inbound=$pid_in_plain; inadmin=18290 ;;
      mtls_keepalive) port=18101; inbound=$pid_in_mtls; inadmin=18291 ;;
      plain_newconn) port=18102; inbound=$pid_in_plain; inadmin=18290 ;;
      mtls_newconn) port=18103; inbound=$pid_in_mtls; inadmin=18291 ;;
    esac
    outbound=$(eval echo "\$pid_$shape")
    hs_before=$(metric "$inadmin" wasp_tls_handshakes_total)
    res_before=$(metric "$inadmin" wasp_tls_resumed_handshakes_total)
    before=$(cpu_secs "$outbound" "$inbound")
    wrk -t1 -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$port/bench" > "$out/wrk-$shape-$round.txt"
    after=$(cpu_secs "$outbound" "$inbound")
    hs_after=$(metric "$inadmin" wasp_tls_handshakes_total)
    res_after=$(metric "$inadmin" wasp_tls_resumed_handshakes_total)
    python3 - "$out/wrk-$shape-$round.txt" "$shape" "$round" "$(( after - before ))" "$hz" "$(( hs_after - hs_before ))" "$(( res_after - res_before ))" >> "$results" <<'PY'
import sys
from bench.wrk import parse
w = parse(sys.argv[1])
shape, rnd, ticks, hz, hs, res = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
secs = w["secs"]
print(f"{shape}\t{rnd}\t{w['rps']:.0f}\t{w['p50']:.3f}\t{w['p99']:.3f}\t{ticks/hz:.2f}\t{hs/secs:.0f}\t{res/secs:.0f}\t{w['error']}")
PY
  done
done

python3 - "$results" "$CONNS" "$DURATION" "$ROUNDS" "$WORKERS" <<'PY'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
conns, dur, rounds, workers = sys.argv[2:6]
by = {}
for s, r, rps, p50, p99, cpu, hs, res, err in rows:
    by.setdefault(s, []).append((float(rps), float(p50), float(p99), float(cpu), float(hs), float(res), err))
print(f"\nwrk -t1 -c{conns} -d{dur} -> outbound wasp -> inbound wasp -> demo app; {rounds} alternating rounds, {workers} worker(s) per wasp; medians\n")
print("| hop | req/s | p50 ms | p99 ms | CPU s (both sidecars) per round | inbound TLS handshakes/s | of which resumed/s | errors |")
print("|---|---|---|---|---|---|---|---|")
med = {}
for s in ["plain_keepalive", "mtls_keepalive", "plain_newconn", "mtls_newconn"]:
    v = by.get(s, [])
    if not v: continue
    m = [statistics.median(x[i] for x in v) for i in range(6)]
    med[s] = m
    errs = "; ".join(sorted({x[6] for x in v if x[6]})) or "none"
    print(f"| {s} | {m[0]:.0f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.2f} | {m[4]:.0f} | {m[5]:.0f} | {errs} |")
if "plain_keepalive" in med and "mtls_keepalive" in med:
    p, t = med["plain_keepalive"], med["mtls_keepalive"]
    print(f"\nmTLS/plaintext keep-alive: throughput {t[0]/p[0]:.2f}x, p99 {t[2]/p[2]:.2f}x (target: throughput >= 0.8x)")
if "plain_newconn" in med and "mtls_newconn" in med:
    p, t = med["plain_newconn"], med["mtls_newconn"]
    print(f"new connection per request: mTLS {t[0]:.0f} req/s vs TCP {p[0]:.0f} req/s ({t[0]/p[0]:.2f}x)")
PY
