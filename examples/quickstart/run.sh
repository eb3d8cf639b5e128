#!/usr/bin/env bash
# The wasp quickstart: a two-service mesh on loopback.
#
#   client --> [productpage sidecar :15006] --> productpage app :9080
#                                                   | calls http://reviews/ via HTTP_PROXY
#              [productpage sidecar :15001] <-------+   (canary filter: 20% of users -> v2)
#                 |                     |
#                 v                     v
#   [reviews sidecar :16006]    [reviews sidecar :16007]
#     reviews-v1 :9081, :9082      reviews-v2 :9083
#     (+ :9084 added live via the watched endpoints file)
#
# Every sidecar runs Wasm filters built from filters/: trace-context,
# access-log, metrics, and on productpage's outbound side the canary router.
# Run as root with ip netns and iptables, it also shows transparent capture:
# an unmodified curl in a pod network namespace of its own, redirected into
# a sidecar by `wasp iptables` (skipped, saying why, elsewhere).
# Builds everything, starts the mesh, sends traffic, prints what the
# filters did, then keeps serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
here="$root/examples/quickstart"
logs="$root/target/quickstart"
mkdir -p "$logs"

command -v cargo >/dev/null || { echo "cargo is needed (https://rustup.rs)"; exit 1; }
command -v curl >/dev/null || { echo "installing curl"; apt-get update -qq && apt-get install -y -qq curl; }

echo "==> building wasp, the demo app and the built-in filters"
cargo build -q -p wasp -p demo-app
WASP_BUILD_FIXTURES=0 ./scripts/build-wasm.sh >/dev/null
mkdir -p "$logs/filters.d"
cp -f target/filters/*.wasm "$logs/filters.d/"
ls -l "$logs/filters.d" | awk 'NR>1 {printf "    %-22s %6d KiB\n", $9, $5/1024}'
bin="$root/target/debug"
# Development certificates for mTLS between the sidecars: a mesh CA and one
# certificate per service (SPIFFE IDs spiffe://mesh.local/ns/default/sa/NAME).
rm -rf "$logs/certs"
"$bin/wasp" certs --out "$logs/certs" --ca-name mesh --service productpage,reviews >/dev/null

# Fail loudly if something from an earlier run still holds the ports.
for port in 9080 9081 9082 9083 9084 9901 9902 15001 15006 16006 16007; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use (an earlier quickstart still running?)"; exit 1
  fi
done

pids=()
# The capture step's namespace and process ids (it runs in a subshell of
# its own, see below), removed here whatever happened to the step.
pod_ns="wasp-quickstart-pod-$$"
pod_pids="$logs/pod.pids"
: > "$pod_pids"
cleanup() {
  for p in "${pids[@]}" $(cat "$pod_pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  if [ -e "/var/run/netns/$pod_ns" ]; then ip netns del "$pod_ns" 2>/dev/null || true; fi
}

# Transparent capture: an app that knows nothing about the proxy (plain
# curl, no proxy settings) calls a service address; iptables rules from
# `wasp iptables` send the connection to the sidecar. Runs in a network
# namespace of its own (a "pod"), never on the host's own tables, and only
# where that is possible: as root, with `ip netns`, iptables and setpriv.
# Runs in a subshell (see capture_step_isolated): a failure here ends this
# step only, never the rest of the quickstart.
capture_step() {
  echo "==> transparent capture: an unmodified client in a pod network namespace"
  local why=""
  if [ "$(id -u)" != 0 ]; then why="needs root (network namespaces and iptables)"
  elif ! command -v ip >/dev/null; then why="iproute2 (ip) is not installed"
  elif ! command -v iptables-restore >/dev/null; then why="iptables is not installed (apt-get install iptables)"
  elif ! command -v setpriv >/dev/null; then why="setpriv (util-linux) is not installed"
  fi
  local ns="$pod_ns"
  if [ -z "$why" ] && ! ip netns add "$ns" 2>/dev/null; then why="the kernel refused a network namespace here"; fi
  if [ -n "$why" ]; then
    echo "    skipped: $why"
    return 0
  fi
  local inns="ip netns exec $ns"
  $inns ip link set lo up
  # A veth pair gives the pod a route to "service addresses" in 10.77.0.0/24.
  $inns ip link add v0 type veth peer name v1
  $inns ip addr add 10.77.0.1/24 dev v0
  $inns ip link set v0 up
  $inns ip link set v1 up
  local dir; dir=$(mktemp -d)
  # The step's own processes end with it (the pod is gone afterwards);
  # the main cleanup also has their ids, for a Ctrl-C meanwhile.
  # (set -e holds in the trap too: nothing in it may fail.)
  trap "rm -rf '$dir'; kill \$(cat '$pod_pids') 2>/dev/null || true; wait 2>/dev/null || true" EXIT
  cat > "$dir/pod.toml" <<TOML
# The pod's sidecar: runs as uid 1337; the app's outbound TCP is redirected
# to the capture listener, which routes HTTP by Host.
[proxy]
workers = 1
[admin]
bind = "127.0.0.1:9901"
[[listeners]]
name = "outbound"
bind = "0.0.0.0:15001"
capture = "outbound"
  [[listeners.routes]]
  match = { host = "reviews" }
  cluster = "reviews"
[clusters.reviews]
endpoints = ["127.0.0.1:19081"]
TOML
  chmod -R a+rX "$dir"
  $inns "$bin/demo-app" reviews-in-pod 127.0.0.1:19081 >"$logs/pod-reviews.log" 2>&1 & echo $! >> "$pod_pids"
  $inns setpriv --reuid 1337 --regid 1337 --clear-groups "$bin/wasp" run --config "$dir/pod.toml" >"$logs/pod-sidecar.log" 2>&1 & echo $! >> "$pod_pids"
  for _ in $(seq 100); do $inns curl -fs http://127.0.0.1:9901/ready >/dev/null 2>&1 && break; sleep 0.1; done
  echo "    wasp iptables --proxy-uid 1337 (in the pod namespace; --dry-run prints the rules):"
  $inns "$bin/wasp" iptables --proxy-uid 1337 --ipv6 auto 2>&1 | sed "s/^/      /"
  $inns iptables -t nat -S | grep WASP | head -6 | sed 's/^/      /'
  echo "    curl -s --resolve reviews:80:10.77.0.2 http://reviews/books   (as uid 65534, no proxy settings):"
  $inns setpriv --reuid 65534 --regid 65534 --clear-groups env -u HTTP_PROXY -u http_proxy \
    curl -s -m 5 --resolve reviews:80:10.77.0.2 http://reviews/books | grep -Ei 'answered|via|x-forwarded-for' | sed 's/^/      /'
  echo "    the pod sidecar counted it: $($inns curl -s http://127.0.0.1:9901/metrics | grep -E '^wasp_requests_total\{listener="outbound"' | grep -v ' 0$' | head -1)"
  $inns "$bin/wasp" iptables --cleanup --ipv6 auto >/dev/null 2>&1
  echo "    wasp iptables --cleanup removed the rules: $($inns iptables -t nat -S | grep -c WASP || true) WASP rules left"
}

# The capture step with `set -e` still in force inside it (a subshell on
# the left of `||` would run with -e ignored, so it runs in the background
# and is waited for) and its failure reported, not fatal.
capture_step_isolated() {
  ( capture_step ) &
  local step=$!
  if ! wait "$step"; then
    echo "    capture step failed (see $logs/pod-sidecar.log, $logs/pod-reviews.log); the rest of the quickstart is unaffected"
  fi
}
trap cleanup EXIT INT TERM

start() { local name=$1; shift; "$@" >"$logs/$name.log" 2>&1 & pids+=($!); }

echo 'endpoints = ["127.0.0.1:9081", "127.0.0.1:9082"]' > "$logs/reviews-v1.endpoints.toml"
start reviews-1 "$bin/demo-app" reviews-1 127.0.0.1:9081
start reviews-2 "$bin/demo-app" reviews-2 127.0.0.1:9082
start reviews-v2 "$bin/demo-app" reviews-v2 127.0.0.1:9083
start productpage env HTTP_PROXY=http://127.0.0.1:15001 "$bin/demo-app" productpage 127.0.0.1:9080 http://reviews/reviews/1
start sidecar-reviews "$bin/wasp" run --config "$here/reviews.toml"
start sidecar-productpage "$bin/wasp" run --config "$here/productpage.toml"

echo "==> waiting for both sidecars to be ready"

"$bin/wasp" --version
for admin in 9901 9902; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$admin/ready" >/dev/null || { echo "sidecar on admin $admin did not start; see $logs"; exit 1; }
done

echo
echo "==> a client calls productpage through its sidecar; productpage calls reviews through the mesh"
curl -s -H 'x-user: ada' http://127.0.0.1:15006/call
echo
echo "==> trace context: the trace id the productpage sidecar started reaches reviews (new span per hop)"
curl -s -H 'x-user: ada' http://127.0.0.1:15006/call | grep -E '^(productpage|reviews)|traceparent' | sed 's/^/    /'
echo
echo "==> canary: 40 users; the router filter sends a sticky 20% of them to reviews-v2"
v1=0; v2=0
for i in $(seq 40); do
  who=$(curl -s -H "x-user: user-$i" http://127.0.0.1:15006/call | grep -o 'reviews-[v12-]*[0-9] answered' | head -1)
  case "$who" in reviews-v2*) v2=$((v2+1));; reviews-*) v1=$((v1+1));; esac
done
echo "    reviews v1: $v1   reviews-v2: $v2"
echo "    x-canary: 1 forces v2: $(curl -s -H 'x-canary: 1' http://127.0.0.1:15006/call | grep -o 'reviews-v2 answered' | head -1)"
echo
echo "==> balancing: the reviews sidecar spreads v1 traffic over its instances (peak EWMA: fastest likely)"
for i in 1 2 3 4; do
  curl -s -x http://127.0.0.1:15001 -H 'x-user: ada' http://reviews/books | head -1 | sed 's/^/    /'
done
echo
echo "==> discovery: a third v1 instance starts and is added to the watched endpoints file"
start reviews-3 "$bin/demo-app" reviews-3 127.0.0.1:9084
sleep 0.3
echo 'endpoints = ["127.0.0.1:9081", "127.0.0.1:9082", "127.0.0.1:9084"]' > "$logs/reviews-v1.endpoints.toml"
sleep 0.5
seen=""
for i in $(seq 30); do
  seen="$seen $(curl -s -x http://127.0.0.1:15001 -H "x-user: ada" http://reviews/books | grep -o 'reviews-[0-9]' | head -1)"
done
echo "    30 calls answered by: $(tr ' ' '\n' <<<"$seen" | grep -v '^$' | sort | uniq -c | tr '\n' ' ')"
echo "    the reviews sidecar's view (http://127.0.0.1:9902/clusters):"
curl -s http://127.0.0.1:9902/clusters | head -c 600 | sed 's/^/      /'
echo
echo
echo "==> mTLS between the sidecars: reviews' inbound only lets productpage's certificate in"
echo "    handshakes on the reviews sidecar: $(curl -s http://127.0.0.1:9902/metrics | awk '/^wasp_tls_handshakes_total\{listener="inbound"\}/ {print $2}')"
echo "    a plaintext call straight to it: $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:16006/ || true) (no TLS, no answer)"
echo "    a TLS call without a client certificate: $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$logs/certs/mesh-ca.pem" --resolve reviews:16006:127.0.0.1 https://reviews:16006/ || true)"
echo "    with reviews' own certificate (valid, but not productpage): $(curl -s --max-time 2 --cacert "$logs/certs/mesh-ca.pem" --cert "$logs/certs/reviews.pem" --key "$logs/certs/reviews-key.pem" --resolve reviews:16006:127.0.0.1 -D - -o /dev/null https://reviews:16006/ | grep -Ei '^(HTTP|x-wasp-error)' | tr -d '\r' | tr '\n' ' ')"
echo
echo "==> a request no route matches gets a clear error"
curl -s -i -x http://127.0.0.1:15001 http://ratings/ | grep -Ei '^(HTTP|x-wasp-error)|no route' | sed 's/^/    /'
echo
echo "==> access-log filter: the last lines each sidecar logged"
grep -h 'access_log' "$logs/sidecar-productpage.log" | tail -2 | sed 's/^/    /' | cut -c1-400
grep -h 'access_log' "$logs/sidecar-reviews.log" | tail -1 | sed 's/^/    /' | cut -c1-400
echo
echo "==> metrics filter and the core's own metrics (http://127.0.0.1:9901/metrics)"
curl -s http://127.0.0.1:9901/metrics | grep -E '^(wasp_http_requests_total|wasp_requests_total)' | grep -v ' 0$' | sed 's/^/    /'
echo
echo "==> hot reload: change the canary to 100% by editing the config; the next calls all go to v2"
cp "$here/productpage.toml" "$logs/productpage.toml.orig"
sed -i 's/percent = 20/percent = 100/' "$here/productpage.toml"
restore() { cp "$logs/productpage.toml.orig" "$here/productpage.toml"; }
trap 'restore; cleanup' EXIT INT TERM
sleep 1
v2=0; for i in $(seq 10); do curl -s -H "x-user: again-$i" http://127.0.0.1:15006/call | grep -q 'reviews-v2 answered' && v2=$((v2+1)); done
echo "    after the edit: $v2/10 calls went to reviews-v2 (generation $(curl -s http://127.0.0.1:9901/reload))"
restore
echo
capture_step_isolated
echo
echo "Sidecar admin APIs: http://127.0.0.1:9901 (productpage), http://127.0.0.1:9902 (reviews): /ready /metrics /config"
echo "Logs: $logs"
echo "Serving until Ctrl-C."
wait
