# kci-receiver: build in the Rust image, run on a slim Debian.
#   docker build -t kci-receiver .
#   docker run -p 8080:8080 -e KCI__GATEWAY_AUTH__BASIC_PASSWORD=... -v kci-data:/app/data kci-receiver
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kci-receiver

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /app kci
WORKDIR /app
COPY --from=build /src/target/release/kci-receiver /usr/local/bin/kci-receiver
COPY config ./config
RUN mkdir -p /app/data && chown kci /app/data
USER kci
# Listen on every interface inside the container; the SQLite file lives in the volume.
ENV KCI__SERVER__HOST=0.0.0.0 \
    KCI__LOG__FORMAT=json
VOLUME ["/app/data"]
EXPOSE 8080
ENTRYPOINT ["kci-receiver"]
CMD ["serve"]
