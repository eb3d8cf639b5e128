#!/usr/bin/env bash
# Instructions per request of wasp's worker thread, with 0, 1 and 4 copies
# of the benchmark filter (tests/wasm/add-headers: adds one request and two
# response headers, community proxy-wasm SDK), counted by callgrind.
# Instruction counts do not depend on how busy the machine is, so unlike
# wall-clock numbers they compare across runs and sessions on a shared box.
#
# Per binary and chain length: wasp (one worker) runs under callgrind;
# WARMUP requests warm it up, counters are zeroed, REQUESTS sequential
# keep-alive GETs are sent (bench/seq_client.py, one connection), counters
# are dumped. The figure is the worker thread's instructions over REQUESTS
# (the thread with the most instructions in the window; the epoch ticker
# and idle threads are not counted). Kernel work is not counted.
#
#   bench/instructions.sh                          # target/release/wasp
#   bench/instructions.sh old=path/a new=path/b    # side by side, one run
#   bench/instructions.sh cl=WASP_WASM_COMPILER=cranelift@path/b   # with env
#   bench/instructions.sh winch=WASP_WASM_COMPILER=winch@target/release/wasp \
#     tiered=target/release/wasp     # Winch only vs tiered up (the default,
#                                    # counted once every tier-up is done)
#   REQUESTS=2000 WARMUP=200 CHAINS="0 1 4" PROFILE=1 bench/instructions.sh
#   BUILD=0 ...                  # do not (re)build the demo app first
#   FILTER=add-unique ...        # another fixture of tests/wasm (add-unique:
#                                # also a request header unique per request)
#   PORT_BASE=28380 ...          # other ports (default 18380, +1, +11)
#   CLIENT=h2c UPSTREAM=http2 ...  # h2c downstream (h2load -c1 -m1, prior
#                                  # knowledge) and/or h2c to the upstream
#   CLIENT=h2c H2LOAD="-c4 -m8" ...  # multiplexed h2c (bench/proxies.sh's
#                                  # shape): streams batch per read/write, so
#                                  # the figure depends on timing more
#   LIMITS='stream_idle_timeout = "0s"' ...  # the listener's [limits]
#
# PROFILE=1 keeps the callgrind dumps in target/bench-instructions/ and
# prints the top functions (inclusive) of each one with callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
REQUESTS=${REQUESTS:-2000}
WARMUP=${WARMUP:-200}
CHAINS=${CHAINS:-"0 1 4"}
PROFILE=${PROFILE:-0}
FILTER=${FILTER:-add-headers}
CLIENT=${CLIENT:-h1}
UPSTREAM=${UPSTREAM:-http1}
out="$root/target/bench-instructions"
mkdir -p "$out/filters.d"
command -v valgrind >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind
}

if [ "$CLIENT" = h2c ] && ! command -v h2load >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client
fi

# requests N: N sequential GETs on one keep-alive connection.
requests() {
  if [ "$CLIENT" = h2c ]; then
    local said
    # shellcheck disable=SC2086 # H2LOAD is a list of flags
    said=$(h2load -n "$1" ${H2LOAD:--c 1 -m 1} "http://127.0.0.1:$PORT/bench")
    [[ $said == *"$1 succeeded, 0 failed"* ]] ||
      { echo "h2load: not all $1 requests succeeded: $said" >&2; exit 1; }
  else
    python3 "$root/bench/seq_client.py" "127.0.0.1:$PORT" "$1" /bench
  fi
}

bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("wasp=$root/target/release/wasp")

[ "${BUILD:-1}" = 0 ] || cargo build -q --release -p demo-app
[ -f "target/wasm-fixtures/wasm32-wasip1/$FILTER.wasm" ] ||
  WASP_BUILD_ASSEMBLYSCRIPT=0 WASM_TARGETS=wasm32-wasip1 ./scripts/build-wasm.sh >/dev/null
cp -f "target/wasm-fixtures/wasm32-wasip1/$FILTER.wasm" "$out/filters.d/$FILTER.wasm"

# PORT_BASE moves the three ports (upstream, listener, admin), so two
# runs on one machine (two worktrees) do not take each other's.
PORT_BASE=${PORT_BASE:-18380}
UP=127.0.0.1:$PORT_BASE
PORT=$((PORT_BASE + 1))
ADMIN=127.0.0.1:$((PORT_BASE + 11))
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
DEMO_THREADS=1 "$root/target/release/demo-app" upstream "$UP" 2>/dev/null & pids+=($!)

config() { # config N LABEL -> path (each label its own module cache)
  local n=$1 f="$out/$2/wasp-$1.toml"
  local pipeline
  mkdir -p "$out/$2"
  pipeline=$(python3 -c "print(', '.join('\"f%d\"' % i for i in range($n)))")
  {
    echo "[proxy]"; echo "workers = 1"; echo "filters_dir = \"$out/filters.d\""
    echo "[admin]"; echo "bind = \"$ADMIN\""
    echo "[log]"; echo "level = \"warn\""
    # limits.instances = 1 keeps the instance pool (and its address-space
    # reservation) small enough for valgrind; one connection needs one.
    for i in 0 1 2 3; do
      echo "[filters.f$i]"; echo "module = \"$FILTER.wasm\""
      echo "[filters.f$i.limits]"; echo "instances = 1"
    done
    echo "[[listeners]]"; echo "name = \"bench\""; echo "bind = \"127.0.0.1:$PORT\""; echo "pipeline = [$pipeline]"
    [ -z "${LIMITS:-}" ] || echo "limits = { $LIMITS }"
    echo "  [[listeners.routes]]"; echo "  cluster = \"upstream\""
    echo "[clusters.upstream]"; echo "endpoints = [\"$UP\"]"; echo "protocol = \"$UPSTREAM\""
  } > "$f"
  echo "$f"
}

# "INSTRUCTIONS FILE" of the busiest thread's dump among files $1*.
busiest() {
  python3 - "$@" <<'PY'
import glob, sys
best = (0, "")
for f in glob.glob(sys.argv[1] + "*"):
    for line in open(f, errors="replace"):
        if line.startswith(("summary:", "totals:")):
            best = max(best, (int(line.split()[1]), f))
            break
print(*best)
PY
}

results="$out/results.tsv"; : > "$results"
for n in $CHAINS; do
  for spec in "${bins[@]}"; do
    label=${spec%%=*}; bin=${spec#*=}; envs=()
    if [[ $bin == *@* ]]; then read -r -a envs <<<"${bin%@*}"; bin=${bin##*@}; fi
    cfg=$(config "$n" "$label")
    run="$out/cg-$label-$n"
    rm -f "$run".* "$run"-*
    (cd "$out" && exec env "${envs[@]}" WASP_WASM_POOL_MIN_INSTANCES=1 valgrind -q --tool=callgrind --separate-threads=yes \
      --dump-instr=no --collect-atstart=yes --callgrind-out-file="$run.%p" \
      "$bin" run --config "$cfg" 2>"$out/wasp-$label-$n.log") & vg=$!; pids+=($vg)
    ok=""
    for _ in $(seq 600); do
      kill -0 "$vg" 2>/dev/null || break
      curl -fs "http://$ADMIN/ready" >/dev/null && curl -fs "http://127.0.0.1:$PORT/bench" >/dev/null && { ok=1; break; }
      sleep 0.5
    done
    [ -n "$ok" ] || { echo "wasp ($label, $n filters) did not start under valgrind; see $out/wasp-$label-$n.log" >&2; exit 1; }
    # With [proxy] wasm_compiler = "auto" (the default) filters start on
    # Winch and tier up to Cranelift in the background: count only once no
    # tier-up is pending (under valgrind a compile takes tens of seconds).
    for _ in $(seq 1200); do
      curl -fs "http://$ADMIN/filters" | grep -q '"tier_up": "pending"' || break
      sleep 0.5
    done
    requests "$WARMUP"
    callgrind_control -z "$vg" >/dev/null
    rm -f "$run".*
    requests "$REQUESTS"
    callgrind_control -d "$vg" >/dev/null
    sleep 1
    read -r instr dump < <(busiest "$run.")
    kill "$vg" 2>/dev/null || true; wait "$vg" 2>/dev/null || true
    [ "${instr:-0}" -gt 0 ] || { echo "no callgrind dump for $label, $n filters" >&2; exit 1; }
    printf '%s\t%s\t%s\n' "$label" "$n" "$instr" >> "$results"
    if [ "$PROFILE" = 1 ]; then
      cp "$dump" "$out/profile-$label-$n.callgrind"
      callgrind_annotate --inclusive=yes --threshold=99 "$dump" 2>/dev/null | head -n 80 > "$out/top-incl-$label-$n.txt" || true
      callgrind_annotate --threshold=95 "$dump" 2>/dev/null | head -n 80 > "$out/top-self-$label-$n.txt" || true
    fi
  done
done

CLIENT=$CLIENT UPSTREAM=$UPSTREAM H2LOAD=${H2LOAD:-} LIMITS=${LIMITS:-} python3 - "$results" "$REQUESTS" "$FILTER" <<'PY'
import os, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
reqs = int(sys.argv[2])
per = {}
labels = []
for label, n, instr in rows:
    per[(label, int(n))] = int(instr) / reqs
    if label not in labels:
        labels.append(label)
client = os.environ.get("CLIENT", "h1")
if client == "h2c" and os.environ.get("H2LOAD"):
    client += f" (h2load {os.environ['H2LOAD']})"
if os.environ.get("LIMITS"):
    client += f", limits {{ {os.environ['LIMITS']} }}"
upstream = os.environ.get("UPSTREAM", "http1")
shape = "multiplexed" if os.environ.get("H2LOAD") else "sequential"
print(f"\nwasp worker-thread instructions per request ({reqs} {shape} keep-alive GETs, client {client}, upstream {upstream}, filter {sys.argv[3]}, callgrind)\n")
print("| build | filters | instr/request | per filter over empty |\n|---|--:|--:|--:|")
for label in labels:
    base = per.get((label, 0))
    for (l, n), v in sorted(per.items()):
        if l != label:
            continue
        extra = f"{(v - base) / n:,.0f}" if base is not None and n > 0 else "-"
        print(f"| {label} | {n} | {v:,.0f} | {extra} |")
PY
