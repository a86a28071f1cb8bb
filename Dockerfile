# gpt2-server as a container image: SageMaker's container contract (`docker run IMAGE serve`,
# port 8080 or $SAGEMAKER_BIND_TO_PORT, GET /ping, POST /invocations, model in /opt/ml/model) and
# the same image on Kubernetes (deploy/kubernetes/). docs/deploy.md explains building, pushing
# and running it.
#
#   docker build -t gpt2-server .
#   docker run --rm -p 8080:8080 -v "$PWD/gpt2:/opt/ml/model:ro" gpt2-server
#
# Every server option is also an environment variable (GPT2_DTYPE, GPT2_KV_DTYPE,
# GPT2_QUEUE_CAPACITY, ...: `docker run --rm gpt2-server --help` lists them).
#
# RUN --mount needs BuildKit (the default builder of Docker 23+, and buildah/podman).

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- build: the Rust toolchain, a release build of the server only -----------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions of Cargo.lock. No RUSTFLAGS: the binary targets
# baseline x86-64 and picks its AVX2 / AVX-512 kernels at run time, so the image runs on any
# x86-64 host (never add -C target-cpu=native here: the image would crash with SIGILL on an older
# CPU than the build machine's). Debug info is stripped (the symbols stay, for backtraces).
# The caches keep the crates.io downloads and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    cargo build --release --locked -p gpt2-server \
 && install -D -m 0755 target/release/gpt2-server /out/gpt2-server

# --- runtime: glibc (the binary needs only libc, libm and libgcc_s) and the binary ---------------
FROM ${RUNTIME_IMAGE} AS runtime
# A fixed numeric non-root user, so that Kubernetes' runAsNonRoot can check it. Model files
# mounted at /opt/ml/model need only be world-readable (SageMaker's are). /opt/ml/model is not
# created here: with nothing mounted there, the server answers with its built-in demo model.
RUN groupadd --system --gid 10001 gpt2 \
 && useradd --system --uid 10001 --gid gpt2 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gpt2
COPY --from=build /out/gpt2-server /usr/local/bin/gpt2-server
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      org.opencontainers.image.title="gpt2-server" \
      org.opencontainers.image.description="GPT-2 inference over HTTP (SageMaker container contract)" \
      org.opencontainers.image.source="https://github.com/gpt2-rs/gpt2-rs" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
USER 10001:10001
# The default port; under SageMaker the server listens on $SAGEMAKER_BIND_TO_PORT when it is set.
EXPOSE 8080
# No HEALTHCHECK: the image has no HTTP client, and SageMaker and Kubernetes probe GET /ping
# themselves (deploy/kubernetes/deployment.yaml).
# `docker run IMAGE` and SageMaker's `docker run IMAGE serve` both start the server; any other
# arguments are server options (`docker run IMAGE --dtype q8_0`).
ENTRYPOINT ["/usr/local/bin/gpt2-server"]
CMD ["serve"]
