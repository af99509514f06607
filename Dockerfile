# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a slim Debian as a non-root user.

FROM rust:1-bookworm AS builder
WORKDIR /app
# Dependencies first, so that a change to the service's code does not rebuild them.
# The manifest names a benchmark; a placeholder satisfies it (benchmarks are not built).
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/initial_sync.rs && cp benches/initial_sync.rs benches/latency.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
COPY migrations ./migrations
# Make sure the real sources are newer than the placeholder build.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sync
COPY --from=builder /app/target/release/external-db-sync /usr/local/bin/external-db-sync
USER 10001:10001
ENV BIND_ADDR=0.0.0.0:8102 \
    LOG_FORMAT=json \
    RUST_LOG=info
EXPOSE 8102
# Apply migrations, then serve. DATABASE_URL and CRON_SECRET come from the deployment.
CMD ["sh", "-c", "external-db-sync migrate && exec external-db-sync serve"]
