#!/usr/bin/env bash
# Cold reload of a ~200 KB real filter: the built-in router (190 KB) is
# swapped SWAPS times by rename into place, each time with a new hash (a
# unique custom section appended, so the code to compile is the router's
# own) and an empty module cache. Reports the time from the rename to
# /filters showing the new hash plus one request served (the generation
# swap follows the load at once). Release build, loopback, bounded.
#
#   bench/reload_cold.sh            # SWAPS=20
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
SWAPS=${SWAPS:-20}
out="$root/target/bench/reload-cold"
rm -rf "$out" && mkdir -p "$out/filters.d"
cargo build -q --release -p wasp -p demo-app
WASP_BUILD_FIXTURES=0 ./scripts/build-wasm.sh >/dev/null
bin="$root/target/release"
cp "$root/target/filters/router.wasm" "$out/filters.d/router.wasm"
cat > "$out/wasp.toml" <<TOML
[proxy]
workers = 1
filters_dir = "$out/filters.d"
module_cache = "$out/cache"
[admin]
bind = "127.0.0.1:18291"
[log]
level = "warn"
[filters.canary]
module = "router.wasm"
config = { rules = [ { header = "x-canary", equals = "1", cluster = "up" } ] }
[[listeners]]
name = "main"
bind = "127.0.0.1:18281"
pipeline = ["canary"]
  [[listeners.routes]]
  cluster = "up"
[clusters.up]
endpoints = ["127.0.0.1:18280"]
TOML
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
DEMO_THREADS=1 "$bin/demo-app" upstream 127.0.0.1:18280 2>/dev/null & pids+=($!)
"$bin/wasp" run --config "$out/wasp.toml" 2>"$out/wasp.log" & pids+=($!)
for _ in $(seq 100); do curl -fs http://127.0.0.1:18291/ready >/dev/null && break; sleep 0.1; done

python3 - "$root/target/filters/router.wasm" "$out" "$SWAPS" <<'PY'
import hashlib, http.client, os, shutil, statistics, sys, time, urllib.request
base, out, swaps = open(sys.argv[1], "rb").read(), sys.argv[2], int(sys.argv[3])
def leb(n):
    b = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        b += bytes([byte | (0x80 if n else 0)])
        if not n:
            return b
def variant(i):
    name, payload = b"wasp-bench", f"v{i}-{time.time_ns()}".encode()
    body = leb(len(name)) + name + payload
    return base + b"\x00" + leb(len(body)) + body
def filters():
    with urllib.request.urlopen("http://127.0.0.1:18291/filters", timeout=2) as r:
        return r.read().decode()
def served():
    c = http.client.HTTPConnection("127.0.0.1", 18281, timeout=2)
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    return r.status
times = []
for i in range(swaps):
    shutil.rmtree(f"{out}/cache", ignore_errors=True)
    data = variant(i)
    sha = hashlib.sha256(data).hexdigest()
    tmp = f"{out}/filters.d/.router.wasm.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    t0 = time.perf_counter()
    os.rename(tmp, f"{out}/filters.d/router.wasm")
    while sha not in filters():
        if time.perf_counter() - t0 > 5:
            sys.exit(f"swap {i}: not taken within 5 s")
        time.sleep(0.001)
    status = served()
    times.append((time.perf_counter() - t0) * 1000)
    if status != 200:
        sys.exit(f"swap {i}: request answered {status}")
    time.sleep(0.3)
print(f"router.wasm {len(base)} B, {swaps} cold swaps by rename (new hash, empty cache): "
      f"median {statistics.median(times):.1f} ms, max {max(times):.1f} ms, min {min(times):.1f} ms")
PY
