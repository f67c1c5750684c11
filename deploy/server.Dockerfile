# syntax=docker/dockerfile:1
#
# The aggregator's image: the bare cipherhive package, which is all that `cipherhive server`,
# `ctl`, `keygen` and `certs` need. No PyTorch (a member node's image, node.Dockerfile, has it):
#
#   docker build -f deploy/server.Dockerfile -t cipherhive-server:0.1.0 .   # from the repository root
#   docker run ... cipherhive-server:0.1.0                                   # server --config /etc/cipherhive/server.toml
#
# Every dependency is installed with `-c constraints.txt`, the same pins as CI.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/cipherhive
ENV PATH=/opt/cipherhive/bin:$PATH
WORKDIR /src

# Dependencies first (their own layer: it survives source changes). The list is the package's
# own dependencies in pyproject.toml, no extra, so it cannot drift from the package's metadata.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install --no-compile -c constraints.txt -r /tmp/requirements.txt

# The package itself (README.md is its long description). Every folder is copied, node and
# demo too: they are subpackages of cipherhive, and cost kilobytes without their extra.
COPY README.md ./
COPY cipherhive ./cipherhive
COPY proto ./proto
COPY server ./server
COPY node ./node
COPY ctl ./ctl
COPY demo ./demo
COPY bench ./bench
RUN pip install --no-compile -c constraints.txt --no-deps . \
 && cipherhive --version \
 && if python -c "import torch" 2>/dev/null; then echo "torch in the server image" >&2; exit 1; fi

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="cipherhive-server" \
      org.opencontainers.image.description="Secure federated aggregation: the aggregator server and ctl" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/cipherhive/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A dedicated unprivileged user (uid/gid 10001, matching the Kubernetes securityContext and
# the compose init script), state owned by it, config by root.
RUN groupadd --system --gid 10001 cipherhive \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/cipherhive --shell /usr/sbin/nologin cipherhive \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/cipherhive \
 && install -d -o root -g root -m 0755 /etc/cipherhive

COPY --from=build /opt/cipherhive /opt/cipherhive

USER 10001:10001
WORKDIR /var/lib/cipherhive
VOLUME ["/var/lib/cipherhive"]

# 7443: gRPC with mutual TLS. 7444: plaintext grpc.health.v1 only ([server] health_listen).
EXPOSE 7443 7444

# Asks the server's health-only port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["cipherhive", "ctl", "--server", "127.0.0.1:7444", "--insecure", "health"]

# SIGTERM (docker stop's default) makes the server shut down gracefully; give it more than
# [server] grace_seconds: `docker stop -t 30`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cipherhive"]
CMD ["server", "--config", "/etc/cipherhive/server.toml"]
