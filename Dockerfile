# Warren in one image: build with the Rust toolchain, run on a slim Debian.
#   docker build -t warren .
#   docker run -p 5672:5672 -v warren-data:/var/lib/warren warren
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY config config
COPY examples examples
COPY tests tests
RUN cargo build --release --locked --bin warren

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/warren warren \
    && mkdir -p /var/lib/warren && chown warren /var/lib/warren
COPY --from=build /src/target/release/warren /usr/local/bin/warren
COPY config/warren.toml /etc/warren/warren.toml
USER warren
ENV WARREN_DATA_DIR=/var/lib/warren
# guest may log in only from loopback, as in RabbitMQ: set WARREN_DEFAULT_USER and
# WARREN_DEFAULT_PASS (or WARREN_LOOPBACK_USERS=) to reach the broker from outside.
VOLUME /var/lib/warren
EXPOSE 5672
ENTRYPOINT ["/usr/local/bin/warren"]
