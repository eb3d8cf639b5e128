#!/usr/bin/env bash
# The wasp quickstart: a two-service mesh on loopback.
#
#   client --> [productpage sidecar :15006] --> productpage app :9080
#                                                   | calls http://reviews/ via HTTP_PROXY
#              [productpage sidecar :15001] <-------+
#                       |
#                       v
#              [reviews sidecar :16006] --> reviews apps :9081, :9082 (round robin)
#
# Builds everything, starts the mesh, sends traffic, prints what the
# sidecars did, then keeps serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
here="$root/examples/quickstart"
logs="$root/target/quickstart"
mkdir -p "$logs"

command -v cargo >/dev/null || { echo "cargo is needed (https://rustup.rs)"; exit 1; }
command -v curl >/dev/null || { echo "installing curl"; apt-get update -qq && apt-get install -y -qq curl; }

echo "==> building wasp and the demo app"
cargo build -q -p wasp -p demo-app
bin="$root/target/debug"

# Fail loudly if something from an earlier run still holds the ports.
for port in 9080 9081 9082 9901 9902 15001 15006 16006; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use (an earlier quickstart still running?)"; exit 1
  fi
done

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

start() { local name=$1; shift; "$@" >"$logs/$name.log" 2>&1 & pids+=($!); }

start reviews-1 "$bin/demo-app" reviews-1 127.0.0.1:9081
start reviews-2 "$bin/demo-app" reviews-2 127.0.0.1:9082
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
curl -s http://127.0.0.1:15006/call
echo
echo "==> four more calls: the reviews sidecar balances across its two instances"
for i in 1 2 3 4; do
  curl -s http://127.0.0.1:15006/call | grep -o 'reviews-[12] answered[^\n]*' | head -1
done
echo
echo "==> an app can also use the outbound listener as its HTTP proxy"
curl -s -x http://127.0.0.1:15001 http://reviews/books | head -1
echo
echo "==> a request no route matches gets a clear error"
curl -s -i -x http://127.0.0.1:15001 http://ratings/ | grep -Ei '^(HTTP|x-wasp-error)|no route'
echo
echo "==> what the productpage sidecar counted (http://127.0.0.1:9901/metrics)"
curl -s http://127.0.0.1:9901/metrics | grep -E '^wasp_requests_total' | grep -v ' 0$'
echo
echo "Sidecar admin APIs: http://127.0.0.1:9901 (productpage), http://127.0.0.1:9902 (reviews): /ready /metrics /config"
echo "Logs: $logs"
echo "Serving until Ctrl-C."
wait
