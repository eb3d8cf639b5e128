#!/usr/bin/env bash
# Filter-chain overhead, end to end on loopback: wasp with an empty
# pipeline, 1 and 4 copies of the benchmark filter (tests/wasm/add-headers,
# one request and two response headers), and the upstream directly, laid
# out by bench/proxies.sh: wrk alone on CPU 0, wasp and the upstream on
# CPU 1, so wasp (not the upstream, as in this script's first layout) is
# what saturates. Reports req/s and wasp's CPU µs per request; the per-filter
# cost is the CPU difference over the empty chain.
#
#   bench/filters.sh                 # ROUNDS=3 DURATION=5s CONNS=32
#
# For a number that load on the machine does not move, count instructions
# instead: bench/instructions.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=${TARGETS:-"direct wasp-0 wasp-1 wasp-4"} exec bench/proxies.sh
