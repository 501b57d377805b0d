# The one AMOSKYS image: `amoskys` runs as bus, agent or operator by its
# first argument. Not built in CI (no container engine on the CI machines);
# `docker build -t ghcr.io/amoskys/amoskys:0.1.0 .` builds it.

FROM rust:1-bookworm AS build
# RocksDB's bindings need libclang; the flow collector links libpcap.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev libpcap-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# RocksDB checksums every WAL record and table block with CRC32C; built
# without SSE4.2 it uses a table-driven CRC that took 10% of the bus's CPU
# at full load. Every x86-64 CPU since 2011 has both instructions.
ENV CXXFLAGS_x86_64_unknown_linux_gnu="-msse4.2 -mpclmul"
RUN cargo build --release --locked --bin amoskys \
 && strip target/release/amoskys \
 && install -m 0755 target/release/amoskys /amoskys

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpcap0.8 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin amoskys
COPY --from=build /amoskys /usr/local/bin/amoskys
# Bus and operator run as this user; the agent DaemonSet runs as root with
# only the capabilities its collectors need (docs/security.md).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/amoskys"]
