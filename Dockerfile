# Warren's container image: one node, run as RabbitMQ's image is run.
#
#   docker build -t warren .
#   docker run -d --name warren -p 5672:5672 -v warren-data:/var/lib/warren \
#       -e RABBITMQ_DEFAULT_USER=app -e RABBITMQ_DEFAULT_PASS=secret warren
#
# Settings: /etc/warren/warren.toml (mount your own there; every setting is documented
# in config/warren.toml), then environment variables: WARREN_<SETTING>, and RabbitMQ's
# RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS / RABBITMQ_DEFAULT_VHOST. The user
# `guest` may log in from loopback only (inside the container), as in RabbitMQ: set a
# user of your own, or WARREN_LOOPBACK_USERS= to let guest in from anywhere.
#
# Base images are build arguments, so that machines without a registry can build from
# images made locally (docker/base-images). Two ways to get the binary (BuildKit, the
# default builder of Docker 23 and later, builds only the stages a target needs):
#   docker build .                       compiles Warren in RUST_IMAGE (stage `runtime`)
#   docker build --target prebuilt .     copies target/release/warren from the build
#                                        context (built on a glibc no newer than
#                                        BASE_IMAGE's, e.g. on Debian bookworm)

ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY config config
RUN cargo build --release --locked --bin warren

# Everything of the runtime image but the binary.
FROM ${BASE_IMAGE} AS runtime-base
RUN groupadd --system --gid 999 warren \
 && useradd --system --uid 999 --gid warren --home-dir /var/lib/warren \
      --shell /usr/sbin/nologin warren \
 && mkdir -p /var/lib/warren /etc/warren \
 && chown warren:warren /var/lib/warren
COPY config/warren.toml /etc/warren/warren.toml
ENV WARREN_CONFIG_FILE=/etc/warren/warren.toml \
    WARREN_DATA_DIR=/var/lib/warren
VOLUME /var/lib/warren
# AMQP, AMQPS, management HTTP API, Prometheus metrics, inter-node traffic.
EXPOSE 5672 5671 15672 15692 25672
USER warren:warren
# A node answers only once recovery is done: give a big store time to load.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/warren", "healthcheck"]
# Exec form: warren is PID 1 and gets docker stop's SIGTERM itself (graceful stop:
# 320 CONNECTION_FORCED to every client, store committed and closed, exit 0).
ENTRYPOINT ["/usr/local/bin/warren"]

# The runtime image from a binary built outside (CI builds it anyway for its tests).
FROM runtime-base AS prebuilt
COPY target/release/warren /usr/local/bin/warren

# The default: the runtime image with the binary compiled in `build`.
FROM runtime-base AS runtime
COPY --from=build /src/target/release/warren /usr/local/bin/warren
