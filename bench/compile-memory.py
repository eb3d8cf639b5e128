#!/usr/bin/env python3
"""Memory and start-up time of wasp with 1 and 4 add-headers filters, cold
(module cache removed) and warm, for one or more binaries side by side.

  bench/compile-memory.py base=/tmp/compileproc-base new=target/release/wasp

Per binary and filter count: VmHWM / RssAnon / RssFile of the server
process (not of compile children) at ready, after every filter tiered up
to Cranelift, and after `wrk -t1 -c32 -d2s`; start-up-to-ready time (the
listener answers 200 with the filters' header), min and median of RUNS
runs, cold and warm. Memory is not timing-sensitive; the times are wall
clock on a shared machine, so the binaries' runs alternate (base, new,
base, new, ...) to meet the same load, and only binaries within one
invocation compare. Config
layout as bench/proxies.sh's wasp-N targets. Needs target/release/demo-app
and target/wasm-fixtures/wasm32-wasip1/add-headers.wasm.
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = int(os.environ.get("RUNS", "5"))
MODULE = os.path.join(ROOT, "target/wasm-fixtures/wasm32-wasip1/add-headers.wasm")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def status_kb(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0])
    return out


def get(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except Exception:
        return None


def write_config(d, n, upstream, port, admin):
    fd = os.path.join(d, "filters.d")
    os.makedirs(fd, exist_ok=True)
    shutil.copy(MODULE, os.path.join(fd, "add-headers.wasm"))
    lines = ["[proxy]", "workers = 1", 'filters_dir = "filters.d"',
             "[admin]", f'bind = "127.0.0.1:{admin}"', "[log]", 'level = "warn"']
    for i in range(n):
        lines += [f"[filters.f{i}]", 'module = "add-headers.wasm"']
    pipeline = ", ".join(f'"f{i}"' for i in range(n))
    lines += ["[[listeners]]", 'name = "bench"', f'bind = "127.0.0.1:{port}"',
              f"pipeline = [{pipeline}]", "  [[listeners.routes]]", '  cluster = "upstream"',
              "[clusters.upstream]", f'endpoints = ["{upstream}"]']
    path = os.path.join(d, "wasp.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def start(binary, path, port):
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "run", "--config", path],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        r = get(f"http://127.0.0.1:{port}/bench", timeout=0.5)
        if r and r[0] == 200 and r[1].get("x-wasm-response") == "1":
            return p, time.monotonic() - t0
        if p.poll() is not None or time.monotonic() - t0 > 60:
            raise SystemExit(f"{binary} did not become ready")
        time.sleep(0.002)


def wait_tiered(admin, n):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = get(f"http://127.0.0.1:{admin}/filters")
        if r:
            fs = json.loads(r[2])
            if len(fs) == n and all(f["compiler"] == "cranelift" for f in fs):
                return
        time.sleep(0.05)
    raise SystemExit("no tier-up")


def one(binary, n, upstream, cold, measure):
    d = tempfile.mkdtemp(prefix="wasp-mem-")
    port, admin = free_port(), free_port()
    path = write_config(d, n, upstream, port, admin)
    if not cold:
        # warm the cache with one run that tiers up
        p, _ = start(binary, path, port)
        wait_tiered(admin, n)
        p.terminate()
        p.wait()
    p, ready = start(binary, path, port)
    row = {"ready_ms": ready * 1000}
    if measure:
        row["ready"] = status_kb(p.pid)
        wait_tiered(admin, n)
        time.sleep(0.3)
        row["tiered"] = status_kb(p.pid)
        subprocess.run(["wrk", "-t1", "-c32", "-d2s", f"http://127.0.0.1:{port}/bench"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        row["wrk"] = status_kb(p.pid)
    p.terminate()
    p.wait()
    shutil.rmtree(d, ignore_errors=True)
    return row


def main():
    bins = [a.split("=", 1) for a in sys.argv[1:]] or [["new", os.path.join(ROOT, "target/release/wasp")]]
    up_port = free_port()
    upstream = f"127.0.0.1:{up_port}"
    up = subprocess.Popen([os.path.join(ROOT, "target/release/demo-app"), "upstream", upstream],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        print("| binary | filters | cache | stage | VmHWM MiB | RssAnon MiB | RssFile MiB |")
        print("|---|---|---|---|---|---|---|")
        times = []
        for n in (1, 4):
            for cold in (True, False):
                cache = "cold" if cold else "warm"
                for name, binary in bins:
                    row = one(binary, n, upstream, cold, True)
                    for stage in ("ready", "tiered", "wrk"):
                        s = row[stage]
                        print(f"| {name} | {n} | {cache} | {stage} | "
                              f"{s['VmHWM'] / 1024:.1f} | {s['RssAnon'] / 1024:.1f} | {s['RssFile'] / 1024:.1f} |")
                # Alternate the binaries run by run: load on a shared
                # machine drifts, and all-of-one-then-all-of-the-other
                # turns that drift into a difference between them.
                ts = {name: [] for name, _ in bins}
                for _ in range(RUNS):
                    for name, binary in bins:
                        ts[name].append(one(binary, n, upstream, cold, False)["ready_ms"])
                for name, _ in bins:
                    times.append((name, n, cache, ts[name]))
        print()
        print("| binary | filters | cache | start-up to ready, min ms | median ms | runs (alternating) |")
        print("|---|---|---|---|---|---|")
        for name, n, c, ts in times:
            print(f"| {name} | {n} | {c} | {min(ts):.1f} | {statistics.median(ts):.1f} | "
                  f"{', '.join(f'{t:.0f}' for t in ts)} |")
    finally:
        up.terminate()
        up.wait()


if __name__ == "__main__":
    main()
