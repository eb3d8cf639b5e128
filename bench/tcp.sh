#!/usr/bin/env bash
# TCP through wasp's L4 listener (`protocol = "tcp"`) beside HAProxy in TCP
# mode and a direct connection, pinned as bench/proxies.sh pins (clients on
# CPU 0, the proxy and the upstream on CPU 1, one worker/thread each):
#   bulk  MB/s over one connection sending 1 MiB writes for DURATION
#   rate  connections/s, each: connect, 1 byte up, a short answer, close
# ROUNDS interleaved rounds, medians. Then the latency protocol detection
# adds: in a network namespace of its own (root and `ip netns` needed, the
# host's tables are never touched), a client's connections are redirected
# by iptables into a capture listener; the time from the client's first
# byte to the upstream reading it (one CLOCK_MONOTONIC for all processes),
# median and p90 over SAMPLES fresh connections, for HTTP and opaque bytes,
# captured vs a plain listener vs direct.
#
#   bench/tcp.sh                     # ROUNDS=3 DURATION=5 SAMPLES=200
#   SMOKE=1 bench/tcp.sh             # one short round: checks the script
#   WASP_BIN=target/release/wasp bench/tcp.sh
#
# Wall-clock numbers: refuses a full run when the 1-minute load average is
# above MAX_LOAD (default 1) and runs the smoke instead, saying so.
# Bounded: every client call has a timeout; the whole run is at most about
# ROUNDS * 3 targets * 2 * DURATION seconds plus the latency samples.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh bench-tcp haproxy=haproxy
DURATION=${DURATION%s}
SAMPLES=${SAMPLES:-200}
MAX_LOAD=${MAX_LOAD:-1}
TARGETS=${TARGETS:-"direct wasp haproxy"}
load=$(cut -d' ' -f1 /proc/loadavg)
if [ "${SMOKE:-0}" != 1 ] && [ "${FORCE:-0}" != 1 ] &&
  python3 -c "import sys; sys.exit(0 if $load > $MAX_LOAD else 1)"; then
  echo "load average $load > $MAX_LOAD: running the smoke only (FORCE=1 for the full run)" >&2
  SMOKE=1
fi
if [ "${SMOKE:-0}" = 1 ]; then ROUNDS=1; DURATION=1; SAMPLES=20; fi
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (clients on 0, proxy on 1)" >&2; exit 2; }
LOADGEN="taskset -c 0"
SERVER="taskset -c 1"
WASP_BIN=${WASP_BIN:-$("$root/scripts/build-release.sh")}
tool="python3 $root/bench/tcp_tool.py"
limit=$((DURATION * 3 + 10))

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # Whatever still runs in the namespace (a wasp started through
  # `ip netns exec` once outlived the kill above) goes with it.
  if [ -n "${NS:-}" ]; then
    for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  fi
  wait 2>/dev/null || true
  if [ -n "${NS:-}" ]; then ip netns del "$NS" 2>/dev/null || true; fi
}
trap cleanup EXIT INT TERM

wait_line() { # file pattern
  for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}
wait_port() { # host:port
  for _ in $(seq 100); do
    python3 -c "import socket,sys; socket.create_connection(('${1%:*}', ${1##*:}), 1)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; return 1
}

# Not shared with tests/l4.rs: those configs are built in Rust (tests/support/config.rs) on free ports.
# wasp.toml's head: one worker, the admin API at $1, warnings only.
wasp_head() {
  printf '[proxy]\nworkers = 1\n[admin]\nbind = "%s"\n[log]\nlevel = "warn"\n' "$1"
}
# A `tcp` listener $1 on $2 whose only route goes to the cluster `up`.
tcp_listener() {
  printf '[[listeners]]\nname = "%s"\nprotocol = "tcp"\nbind = "%s"\n  [[listeners.routes]]\n  cluster = "up"\n' "$1" "$2"
}

UP=127.0.0.1:18580
$SERVER $tool serve "${UP##*:}" >"$out/upstream.log" 2>&1 & pids+=($!)
wait_line "$out/upstream.log" ready

declare -A addr
for t in $TARGETS; do
  case $t in
    direct) addr[$t]=$UP ;;
    wasp)
      addr[$t]=127.0.0.1:18581
      { wasp_head 127.0.0.1:18681; tcp_listener tcp "${addr[$t]}"
        printf '[clusters.up]\nendpoints = ["%s"]\n' "$UP"; } > "$out/wasp.toml"
      $SERVER "$WASP_BIN" run --config "$out/wasp.toml" >"$out/wasp.log" 2>&1 & pids+=($!)
      wait_port "${addr[$t]}" ;;
    haproxy)
      addr[$t]=127.0.0.1:18582
      cat > "$out/haproxy.cfg" <<HAP
global
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend f
  bind ${addr[$t]}
  default_backend b
backend b
  server s1 $UP
HAP
      $SERVER haproxy -f "$out/haproxy.cfg" >"$out/haproxy.log" 2>&1 & pids+=($!)
      wait_port "${addr[$t]}" ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
done

declare -A bulk rate
for r in $(seq "$ROUNDS"); do
  for t in $TARGETS; do
    bulk[$t]+="$(timeout "$limit" $LOADGEN $tool bulk "${addr[$t]}" "$DURATION") "
    rate[$t]+="$(timeout "$limit" $LOADGEN $tool rate "${addr[$t]}" "$DURATION") "
  done
done
median() { python3 -c "import statistics,sys; print(int(statistics.median(map(float, sys.argv[1:]))))" $1; }
echo
echo "TCP through an L4 proxy ($ROUNDS round(s) of ${DURATION}s, medians; load before: $load)"
printf '%-8s %10s %12s\n' target "bulk MB/s" "conn/s"
for t in $TARGETS; do
  printf '%-8s %10s %12s\n' "$t" "$(median "${bulk[$t]}")" "$(median "${rate[$t]}")"
done

# --- detection latency, in a namespace of our own -----------------------
if [ "$(id -u)" != 0 ] || ! command -v iptables >/dev/null || ! ip netns list >/dev/null 2>&1; then
  echo; echo "detection latency: skipped (needs root, iptables and ip netns)"; exit 0
fi
NS=wasp-bench-tcp-$$
ip netns add "$NS"
inns() { ip netns exec "$NS" "$@"; }
inns ip link set lo up
DUP=127.0.0.1:18590
inns $SERVER $tool serve "${DUP##*:}" >"$out/ns-upstream.log" 2>&1 & pids+=($!)
wait_line "$out/ns-upstream.log" ready
{ wasp_head 127.0.0.1:18691; tcp_listener tcp 127.0.0.1:15002; cat <<TOML
[[listeners]]
name = "outbound"
bind = "127.0.0.1:15001"
capture = "outbound"
[[listeners]]
name = "http"
bind = "127.0.0.1:15080"
  [[listeners.routes]]
  cluster = "up"
[clusters.up]
endpoints = ["$DUP"]
TOML
} > "$out/wasp-capture.toml"
inns $SERVER "$WASP_BIN" run --config "$out/wasp-capture.toml" >"$out/wasp-capture.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do inns python3 -c "import socket; socket.create_connection(('127.0.0.1', 15002), 1)" 2>/dev/null && break; sleep 0.1; done
# Only the client's connections (source 127.0.0.2) are captured; wasp's
# own connection to the original destination comes from 127.0.0.1.
inns iptables -t nat -A OUTPUT -p tcp -s 127.0.0.2 -d "${DUP%:*}" --dport "${DUP##*:}" -j REDIRECT --to-ports 15001
lat() { inns timeout 60 $LOADGEN $tool latency "$@"; }
echo
echo "first byte to upstream, $SAMPLES connections each: median p90 (us)"
printf '%-34s %s\n' "direct, HTTP" "$(lat "$DUP" "$SAMPLES" http)"
printf '%-34s %s\n' "HTTP listener (routes by Host)" "$(lat 127.0.0.1:15080 "$SAMPLES" http)"
printf '%-34s %s\n' "captured, detected HTTP" "$(lat "$DUP" "$SAMPLES" http 127.0.0.2)"
printf '%-34s %s\n' "direct, opaque" "$(lat "$DUP" "$SAMPLES" raw)"
printf '%-34s %s\n' "tcp listener, opaque" "$(lat 127.0.0.1:15002 "$SAMPLES" raw)"
printf '%-34s %s\n' "captured, detected opaque" "$(lat "$DUP" "$SAMPLES" raw 127.0.0.2)"
# The captured rows went through the capture listener, not around it.
captured=$(inns python3 -c "
import urllib.request
text = urllib.request.urlopen('http://127.0.0.1:18691/metrics', timeout=5).read().decode()
print(sum(float(l.rsplit(' ', 1)[1]) for l in text.splitlines()
          if l.startswith('wasp_tcp_connections_total{') and 'listener=\"outbound\"' in l))")
echo "(capture listener's opaque connections: $captured of $SAMPLES expected)"
