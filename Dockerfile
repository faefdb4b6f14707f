# syntax=docker/dockerfile:1

# Build stages: cargo-chef caches the dependency build in its own layer, so a source change
# rebuilds only nen-relay itself. The repository is a Cargo workspace: the recipe holds every
# member's manifest (tools/* too, or cargo cannot load the workspace), but only the nen-relay
# binary and its own dependencies are built, and only it is shipped.
FROM rust:1.95-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin nen-relay
COPY . .
RUN cargo build --release --locked --bin nen-relay \
    && mkdir -p /staging/var/lib/nen-relay

# Runtime: distroless (glibc, CA certificates, no shell, no package manager), as the non-root
# user it ships (uid 65532).
FROM gcr.io/distroless/cc-debian12:nonroot
WORKDIR /app
COPY --from=builder /build/target/release/nen-relay /app/nen-relay
COPY --from=builder /build/config /app/config
# Where the embedded SQLite store lives when DATABASE_URL is not set.
COPY --from=builder --chown=65532:65532 /staging/var/lib/nen-relay /var/lib/nen-relay
VOLUME ["/var/lib/nen-relay"]
ENV NEN_RELAY_ENV=production
USER 65532:65532
EXPOSE 8080
# The binary probes itself: the image needs no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/app/nen-relay", "healthcheck"]
ENTRYPOINT ["/app/nen-relay"]
CMD ["serve"]
