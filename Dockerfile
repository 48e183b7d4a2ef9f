# azure-proxy as a container image: a static musl binary on an empty (`scratch`) base.
#
#   docker build -t azure-proxy .
#   docker run --rm -p 8000:8000 --stop-timeout 35 \
#       -v "$PWD/azure_instances.json:/config/azure_instances.json:ro" \
#       -e WESTUS_API_KEY=... azure-proxy
#
# The build targets x86_64 only (the musl cross toolchain comes from Debian's musl-tools, which builds for the
# host). On an arm64 machine build with `docker build --platform linux/amd64 ...`.

# ---- build stage -----------------------------------------------------------------------------------------------
# Pin a concrete version (e.g. rust:1.85-bookworm, the crate's rust-version) for reproducible builds.
FROM rust:1-bookworm AS build

# musl-gcc: ring (rustls' crypto) compiles C code. ca-certificates is already in the image (see the final stage).
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl

WORKDIR /src

# Dependencies first, against placeholder sources, so that this layer is reused as long as Cargo.toml and
# Cargo.lock do not change (a source edit then only rebuilds the crate itself).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --target x86_64-unknown-linux-musl --bin azure-proxy \
    && rm -rf src

COPY src ./src
# COPY keeps the files' modification times, which can be older than the placeholder build above; touch them so
# that cargo does not take the placeholder binary for up to date. The final image has no shell, so check here
# that the binary is static (no ELF interpreter; `ldd` exits 0 on static-pie binaries, so it cannot tell) and
# starts.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --target x86_64-unknown-linux-musl --bin azure-proxy \
    && cp target/x86_64-unknown-linux-musl/release/azure-proxy /azure-proxy \
    && if readelf -l /azure-proxy | grep -q INTERP; then echo 'azure-proxy is not static' >&2; exit 1; fi \
    && /azure-proxy --version

# /etc/passwd and /etc/group with one unprivileged user, so that tools (and humans) see a name for uid 10001.
RUN echo 'proxy:x:10001:10001:azure-proxy:/nonexistent:/sbin/nologin' > /passwd \
    && echo 'proxy:x:10001:' > /group

# ---- final stage: nothing but the binary -------------------------------------------------------------------------
FROM scratch

COPY --from=build /azure-proxy /azure-proxy
# The binary has Mozilla's roots built in and does not need this file; it is there for a private CA bundle setup
# and for anything else that expects the standard path.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /passwd /etc/passwd
COPY --from=build /group /etc/group

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# Mount the config (a file or a ConfigMap) at /config. Instance keys named by `api_key_env` come from the
# environment (-e / --env-file / a Kubernetes Secret). /etc/hosts and /etc/resolv.conf (for DNS) are provided by
# the container runtime.
ENV AZURE_PROXY_CONFIG=/config/azure_instances.json
EXPOSE 8000

# No HEALTHCHECK: there is no shell or curl in the image. Probe GET /healthz (alive) and GET /readyz (at least one
# instance available) from outside, e.g. Kubernetes httpGet probes (deploy/kubernetes/sidecar.yaml).
# SIGTERM (the default stop signal) drains requests in flight for up to drain_seconds (default 30): give the
# container more than that to stop (docker run --stop-timeout 35, compose stop_grace_period: 35s).
ENTRYPOINT ["/azure-proxy"]
