# wasp container image: build in a full Rust image, run in distroless.
#   docker build -t wasp .
#   docker run -v $PWD/wasp.toml:/etc/wasp/wasp.toml -v $PWD/filters.d:/etc/wasp/filters.d wasp

FROM rust:1-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip1
COPY . .
# scripts/build-release.sh links glibc statically (static PIE, ~1.4 MiB less
# RSS); the cc base image keeps the same glibc's NSS modules for getaddrinfo.
RUN mkdir -p /out/filters.d \
 && cp "$(scripts/build-release.sh)" /out/wasp \
 && cargo build --release --target wasm32-wasip1 -p access-log -p metrics -p trace-context -p router \
 && cp target/wasm32-wasip1/release/access_log.wasm target/wasm32-wasip1/release/metrics.wasm \
       target/wasm32-wasip1/release/trace_context.wasm target/wasm32-wasip1/release/router.wasm /out/filters.d/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wasp /usr/local/bin/wasp
COPY --from=build --chown=1337:1337 /out/filters.d /etc/wasp/filters.d
# The proxy's own UID/GID: `wasp iptables --proxy-uid 1337` exempts its
# connections from capture (the default), as Istio does with 1337.
USER 1337:1337
VOLUME ["/etc/wasp/filters.d"]
# 15021: [admin] probes (/live /ready /metrics); the admin API itself stays on loopback.
EXPOSE 15001 15006 15021
ENTRYPOINT ["/usr/local/bin/wasp"]
CMD ["run", "--config", "/etc/wasp/wasp.toml"]
