# syntax=docker/dockerfile:1
#
# ketchup-gateway container image. Needs BuildKit (the default builder since Docker 23):
#   docker build -t ketchup-gateway .
# or use docker-compose.yml. The image holds no configuration: mount one at
# /etc/ketchup-gateway/gateway.toml that listens on 0.0.0.0:8080 (see config/docker/gateway.toml).

# ---- build -----------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The cargo registry and target/ live in BuildKit cache mounts, so a source change rebuilds only
# this crate, not its dependencies. A cache mount is not part of the image: copy the binary out.
RUN --mount=type=cache,id=ketchup-gateway-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=ketchup-gateway-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=ketchup-gateway-target,target=/src/target,sharing=locked \
    cargo build --profile production --locked --bin ketchup-gateway \
 && install -D -m 0755 target/production/ketchup-gateway /out/ketchup-gateway

# ---- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# An unprivileged user, and the data directory it owns (the SQLite ledger is
# /var/lib/ketchup-gateway/ledger.db; a named volume mounted there starts with this ownership).
RUN groupadd --system --gid 10001 ketchup \
 && useradd --system --uid 10001 --gid ketchup --no-create-home \
      --home-dir /var/lib/ketchup-gateway --shell /usr/sbin/nologin ketchup \
 && install -d -o ketchup -g ketchup -m 0750 /var/lib/ketchup-gateway \
 && install -d -m 0755 /etc/ketchup-gateway
COPY --from=build /out/ketchup-gateway /usr/local/bin/ketchup-gateway

USER 10001:10001
WORKDIR /var/lib/ketchup-gateway
# No transparent huge pages for the process (mimalloc disables them with prctl at start): on a
# host whose THP mode is `always`, each thread's heap would otherwise fill a 2 MiB page of its own.
ENV MIMALLOC_ALLOW_THP=0
EXPOSE 8080
# The gateway finishes in-flight requests on SIGTERM ([server] shutdown_timeout); give it more
# than that before the kill (docker stop -t / stop_grace_period). SIGHUP reloads teams and keys.
STOPSIGNAL SIGTERM
# No curl in the image: the binary checks itself (exit 0 on HTTP 200).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["ketchup-gateway", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["ketchup-gateway"]
CMD ["serve", "--config", "/etc/ketchup-gateway/gateway.toml"]
