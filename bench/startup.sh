#!/usr/bin/env bash
# Time from `wasp run` to /ready answering 200, with 4 filters: median and
# max of N starts, first with a cold module cache (compiled every time),
# then with the warm on-disk cache. Bounded: 2 x N starts.
#
#   bench/startup.sh                  # N=20
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
N=${N:-20}
out="$root/target/bench-startup"
rm -rf "$out"; mkdir -p "$out/filters.d"
cargo build -q --release -p wasp
WASP_BUILD_FIXTURES=0 ./scripts/build-wasm.sh >/dev/null
cp -f target/filters/*.wasm "$out/filters.d/"
cat > "$out/wasp.toml" <<TOML
[proxy]
workers = 2
filters_dir = "filters.d"
module_cache = "cache"
[admin]
bind = "127.0.0.1:18291"
[log]
level = "warn"
[filters.trace]
module = "trace_context.wasm"
[filters.access_log]
module = "access_log.wasm"
[filters.metrics]
module = "metrics.wasm"
[filters.router]
module = "router.wasm"
config = { rules = [ { header = "x-canary", equals = "1", cluster = "c" } ] }
[[listeners]]
name = "in"
bind = "127.0.0.1:18281"
pipeline = ["trace", "access_log", "metrics", "router"]
  [[listeners.routes]]
  cluster = "c"
[clusters.c]
endpoints = ["127.0.0.1:9"]
TOML
measure() {
  python3 - "$root/target/release/wasp" "$out/wasp.toml" "$1" <<'PY'
import subprocess, sys, time, urllib.request
wasp, cfg, mode = sys.argv[1:4]
start = time.monotonic()
p = subprocess.Popen([wasp, "run", "--config", cfg], stderr=subprocess.DEVNULL)
while True:
    try:
        if urllib.request.urlopen("http://127.0.0.1:18291/ready", timeout=1).status == 200:
            break
    except Exception:
        pass
    if p.poll() is not None or time.monotonic() - start > 20:
        sys.exit("wasp exited or did not get ready; run it by hand with this config to see why")
    time.sleep(0.001)
print(f"{(time.monotonic() - start) * 1000:.1f}")
p.terminate(); p.wait()
PY
}
for mode in cold warm; do
  : > "$out/$mode.txt"
  for i in $(seq "$N"); do
    [ "$mode" = cold ] && rm -rf "$out/cache"
    measure "$mode" >> "$out/$mode.txt"
  done
done
python3 - "$out" <<'PY'
import sys, statistics
out = sys.argv[1]
print("| module cache | median ms to ready | max ms |\n|---|---|---|")
for mode in ["cold", "warm"]:
    v = [float(x) for x in open(f"{out}/{mode}.txt").read().split() if x != "timeout"]
    print(f"| {mode} | {statistics.median(v):.1f} | {max(v):.1f} |")
PY
