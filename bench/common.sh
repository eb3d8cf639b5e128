# Sourced by the load benchmarks, from the repository root:
#   . bench/common.sh NAME [COMMAND=DEBIAN_PACKAGE ...]
# Sets root, the shared knobs (ROUNDS, DURATION, CONNS, WORKERS: the
# environment overrides them), out=target/NAME (created), and installs the
# Debian package of each command that is missing (wrk always).
root=$(pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-32}
WORKERS=${WORKERS:-1}
out="$root/target/$1"
mkdir -p "$out"
shift
bench_need=()
for tool in wrk=wrk "$@"; do
  command -v "${tool%%=*}" >/dev/null || bench_need+=("${tool#*=}")
done
if [ ${#bench_need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${bench_need[@]}"
fi
