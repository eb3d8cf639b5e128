#!/usr/bin/env bash
# Builds the wasp binary to deploy and prints its path on stdout.
#
#   scripts/build-release.sh            # -> target/<host triple>/dist/wasp
#
# It uses the `dist` profile (Cargo.toml: `release` plus whole-program LTO).
# On glibc Linux the binary is a static PIE (glibc linked in, still
# position-independent, so ASLR stays). A dynamically linked wasp maps all
# of libc.so, libm.so and ld.so and keeps about 2 MiB of their pages
# resident, most of it code that wasp never runs; linked statically, only the
# C library functions wasp calls are in the binary, and its RSS is about
# 1.4 MiB lower (bench/run.sh measures it). wasp resolves names itself
# (hickory) except for `host:port` endpoints in the config, which go through
# getaddrinfo; a static glibc still loads the NSS modules of the glibc it was
# built with for that, so run it where it was built or in an image with the
# same glibc.
#
# The static flag is given with an explicit --target: without one, cargo
# would apply it to build scripts and proc-macros too, which cannot be
# static. Elsewhere (macOS, musl) the binary is linked as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
case "$host" in
  *-linux-gnu*)
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
      cargo build -q --profile dist --locked -p wasp --target "$host"
    echo "$(pwd)/target/$host/dist/wasp"
    ;;
  *)
    cargo build -q --profile dist --locked -p wasp
    echo "$(pwd)/target/dist/wasp"
    ;;
esac
