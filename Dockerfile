# wasp container image: build in a full Rust image, run in distroless.
#   docker build -t wasp .
#   docker run -v $PWD/wasp.toml:/etc/wasp/wasp.toml -v $PWD/filters.d:/etc/wasp/filters.d wasp

FROM rust:1-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip1
COPY . .
RUN cargo build --release -p wasp \
 && mkdir -p /out/filters.d \
 && cp target/release/wasp /out/wasp \
 && (cargo build --release --target wasm32-wasip1 --manifest-path filters/Cargo.toml 2>/dev/null || true) \
 && (cp target/wasm32-wasip1/release/*.wasm /out/filters.d/ 2>/dev/null || true)

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wasp /usr/local/bin/wasp
COPY --from=build --chown=nonroot:nonroot /out/filters.d /etc/wasp/filters.d
USER nonroot
VOLUME ["/etc/wasp/filters.d"]
EXPOSE 15001 15006 9901
ENTRYPOINT ["/usr/local/bin/wasp"]
CMD ["run", "--config", "/etc/wasp/wasp.toml"]
