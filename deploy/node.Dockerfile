# syntax=docker/dockerfile:1
#
# A member node's image: cipherhive with its `node` extra (PyTorch, scikit-learn, opacus,
# safetensors). The compose `init` service runs in it too (`cipherhive node layout` loads the
# trainer's model):
#
#   docker build -f deploy/node.Dockerfile -t cipherhive-node:0.1.0 .       # from the repository root
#   docker run ... cipherhive-node:0.1.0                                     # node --config /etc/cipherhive/node.toml
#
# Every dependency is installed with `-c constraints.txt`, the same pins as CI.
# torch from PyPI is a large (CUDA) build on x86_64; where the PyTorch CPU index is
# reachable, `--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu`
# installs the CPU build of the same pinned version first (2.13.0+cpu satisfies
# torch==2.13.0, so the second install keeps it).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/cipherhive
ENV PATH=/opt/cipherhive/bin:$PATH
WORKDIR /src

# Dependencies first (their own layer: it survives source changes). The list is read from
# pyproject.toml, the package's dependencies and its `node` extra, so it cannot drift from
# the package's own metadata.
COPY pyproject.toml constraints.txt ./
ARG TORCH_INDEX_URL=""
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" -c constraints.txt torch; \
    fi \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['node']))" \
        > /tmp/requirements.txt \
 && pip install --no-compile -c constraints.txt -r /tmp/requirements.txt

# The package itself (README.md is its long description).
COPY README.md ./
COPY cipherhive ./cipherhive
COPY proto ./proto
COPY server ./server
COPY node ./node
COPY ctl ./ctl
COPY demo ./demo
COPY bench ./bench
RUN pip install --no-compile -c constraints.txt --no-deps . \
 && cipherhive --version

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="cipherhive-node" \
      org.opencontainers.image.description="Secure federated aggregation: a member node" \
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
# The compose init service runs this (see deploy/docker-compose.yml).
COPY deploy/compose/init.sh /usr/local/share/cipherhive/init.sh

USER 10001:10001
WORKDIR /var/lib/cipherhive
VOLUME ["/var/lib/cipherhive"]

# A node serves no port (it dials the server), so there is nothing for a health check to ask.
HEALTHCHECK NONE

# The first SIGTERM (docker stop's default) stops the node within a training batch; a second
# exits at once.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cipherhive"]
CMD ["node", "--config", "/etc/cipherhive/node.toml"]
