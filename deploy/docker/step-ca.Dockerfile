# syntax=docker/dockerfile:1.7
# step-ca for environments without the official `smallstep/step-ca` image (air-gapped mirrors that
# carry only Debian). It builds step-ca 0.19 from Debian bookworm's packaged Go source exactly as
# pki/step-ca/build.sh does for the tests (GOPATH mode, offline, CGO off, pki/step-ca/main.go as the
# main package), then ships the static binary alone on debian slim.
#
#   docker build -f deploy/docker/step-ca.Dockerfile -t strongroom/step-ca:0.19 .
#
# It is a drop-in for the official image as used in deploy/: same layout under /home/step
# (config/ca.json, certs/, secrets/password, db/), same CONFIGPATH/PWDPATH variables, same command.
# Differences: it never runs `step ca init` (the Strongroom bootstrap job writes ca.json with
# `strongroom pki init`), it runs as uid 10001 like the other Strongroom images, and the binary
# carries no file capabilities (it listens on :9000, so it needs none).

ARG DEBIAN_IMAGE=debian:bookworm
ARG DEBIAN_SLIM_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends golang-go golang-github-smallstep-certificates-dev \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pki/step-ca/build.sh pki/step-ca/main.go pki/step-ca/
RUN bash pki/step-ca/build.sh /out/step-ca \
 && /out/step-ca --version

FROM ${DEBIAN_SLIM_IMAGE} AS step-ca
LABEL org.opencontainers.image.title="strongroom-step-ca" \
      org.opencontainers.image.description="step-ca 0.19 built from Debian's packaged source"
RUN groupadd --system --gid 10001 step \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/step --no-create-home \
      --shell /usr/sbin/nologin step \
 && install -d -o 10001 -g 10001 -m 0700 /home/step
COPY --from=build /out/step-ca /usr/local/bin/step-ca
ENV STEPPATH=/home/step \
    CONFIGPATH=/home/step/config/ca.json \
    PWDPATH=/home/step/secrets/password
USER 10001:10001
WORKDIR /home/step
VOLUME ["/home/step"]
EXPOSE 9000
STOPSIGNAL SIGTERM
# No HTTP client is shipped: the check is that the CA's TLS port accepts connections (bash /dev/tcp).
# Orchestrators should probe GET https://<ca>:9000/health instead (the Helm chart does).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9000"]
CMD ["/bin/sh", "-c", "exec /usr/local/bin/step-ca --password-file \"$PWDPATH\" \"$CONFIGPATH\""]
