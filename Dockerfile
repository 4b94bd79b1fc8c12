# syntax=docker/dockerfile:1
# Multi-stage build of the relay: a full Rust toolchain to compile (librdkafka
# is built from source by rdkafka-sys), a slim Debian runtime to run.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
        build-essential cmake pkg-config python3 zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Cache dependencies: build once with an empty main, then the real sources.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked || true
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /app relay
WORKDIR /app
COPY --from=build /src/target/release/chat-relay /usr/local/bin/chat-relay
COPY static ./static
USER relay
ENV BIND=0.0.0.0:8080 STATIC_DIR=/app/static DATABASE_URL=sqlite:///app/data/chat-relay.db
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=3s --retries=10 CMD ["chat-relay", "healthcheck"]
ENTRYPOINT ["chat-relay"]
CMD ["serve"]
