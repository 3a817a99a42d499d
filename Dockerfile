# syntax=docker/dockerfile:1
# Multi-stage build: compile with the Rust toolchain, run on a minimal,
# non-root image that has glibc and CA certificates (rustls uses the
# platform's trust store to verify Entra ID and Dataverse).

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so code changes reuse the cached dependency layer.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/hot_path.rs \
    && cargo build --release --locked --bin dataverse-proxy \
    && rm -rf src benches
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin dataverse-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/dataverse-proxy /usr/local/bin/dataverse-proxy
# Inside a container the listeners must be reachable from outside the
# container's loopback; who may reach them is the job of the network policy.
ENV DATAVERSE_PROXY_LISTEN=0.0.0.0:8080 \
    DATAVERSE_PROXY_ADMIN_LISTEN=0.0.0.0:9090 \
    DATAVERSE_PROXY_LOG_FORMAT=json
EXPOSE 8080 9090
# uid 65532; the process writes nothing to disk, so a read-only root
# filesystem works.
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/dataverse-proxy"]
CMD ["serve"]
