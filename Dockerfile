# syntax=docker/dockerfile:1
# kci-receiver's image: a Rust build stage, and a small runtime stage holding one binary (the
# configuration defaults are compiled in: no files needed) run as a numeric non-root user.
#
#   docker build -t kci-receiver .
#   docker run -p 8080:8080 -e KCI__GATEWAY_AUTH__BASIC_PASSWORD=... \
#     -e KCI__DATABASE__URL=postgres://kci:...@db:5432/kci kci-receiver
#
# On the embedded default (SQLite) the database file is /var/lib/kci-receiver/kci-receiver.db:
# mount a volume there to keep it (`-v kci-data:/var/lib/kci-receiver`). No VOLUME is declared,
# so PostgreSQL deployments get none they do not want.
#
# Build arguments: RUST_IMAGE and RUNTIME_IMAGE (the bases; a registry mirror, or a local base).
# The build stage needs a C compiler and make besides Rust (jemalloc, the service's allocator, is
# built from source): the rust:*-bookworm images have both, the rust:*-slim ones do not.
# `--target runtime-prebuilt` packages a binary built elsewhere instead of compiling it here (read
# from prebuilt/kci-receiver in the build context; scripts/container-proof does that).
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, in a layer of their own: rebuilt when Cargo.toml or Cargo.lock change, not
# when the code does (the workspace's crates are stubbed for this step).
COPY Cargo.toml Cargo.lock ./
COPY entity/Cargo.toml entity/
COPY migration/Cargo.toml migration/
COPY tools/Cargo.toml tools/
COPY vendor vendor
RUN mkdir -p src entity/src migration/src tools/src tests/api \
    && echo 'fn main() {}' > src/main.rs && echo 'fn main() {}' > tools/src/main.rs \
    && touch src/lib.rs entity/src/lib.rs migration/src/lib.rs tools/src/lib.rs tests/api/main.rs \
    && cargo build --release --locked -p kci-receiver \
    && rm -rf src entity/src migration/src tools/src tests
# Then the code; its files are touched so that cargo sees them newer than the stubs.
COPY . .
RUN find src entity/src migration/src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p kci-receiver --bin kci-receiver \
    && strip target/release/kci-receiver

# The runtime, without its binary: what both final stages share.
FROM ${RUNTIME_IMAGE} AS runtime-base
# CA certificates for PostgreSQL, RabbitMQ, the JWK Set and the Tenant API over TLS (a base that
# already has them skips the download).
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update && apt-get install -y --no-install-recommends ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && mkdir -p /var/lib/kci-receiver && chown 10001:10001 /var/lib/kci-receiver
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /var/lib/kci-receiver
ENV KCI__SERVER__HOST=0.0.0.0 \
    KCI__LOG__FORMAT=json \
    KCI__DATABASE__URL=sqlite:///var/lib/kci-receiver/kci-receiver.db?mode=rwc
EXPOSE 8080
# Probes /readyz without curl (exit 0 ready, 1 not).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["kci-receiver", "healthcheck"]
ENTRYPOINT ["kci-receiver"]
CMD ["serve"]

# `--target runtime-prebuilt`: a binary built outside (same glibc as the runtime base), read from
# prebuilt/kci-receiver in the build context; the build stage is not run.
FROM runtime-base AS runtime-prebuilt
COPY prebuilt/kci-receiver /usr/local/bin/kci-receiver

# The default target: the binary from the build stage.
FROM runtime-base AS runtime
COPY --from=build /src/target/release/kci-receiver /usr/local/bin/kci-receiver
