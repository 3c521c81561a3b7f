# llmproxy container image.
#
#   scripts/build-image.sh                    # python:3.12-slim base
#   scripts/build-image.sh --debootstrap      # a local Debian bookworm base
#   docker build -t llmproxy .                # plain Docker works too
#
# BASE may be any Debian-like image with python3 (>= 3.11) and its venv module
# (python3-venv on Debian): both stages use `python3`, never a versioned path, and
# the virtual environment lives at /opt/llmproxy in both, so its interpreter link
# resolves in the final stage as it did in the first.
ARG BASE=python:3.12-slim

FROM ${BASE} AS build

# Package-index settings for networks that need them; unset by default, and
# build arguments of this stage never reach the final image.
ARG PIP_INDEX_URL
ARG PIP_CERT

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/llmproxy

WORKDIR /src
COPY pyproject.toml README.md ./
COPY llmproxy ./llmproxy

# Build the wheel, install it with its dependencies (binary wheels only: the
# final image has no compiler), then drop the installers from the runtime venv.
RUN /opt/llmproxy/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/llmproxy/bin/pip install --only-binary=:all: /wheels/llmproxy-*.whl \
    && /opt/llmproxy/bin/python -c "import llmproxy.cli, uvloop" \
    && /opt/llmproxy/bin/pip uninstall --yes pip setuptools wheel


FROM ${BASE}

COPY --from=build /opt/llmproxy /opt/llmproxy
COPY deploy/docker/config.yaml /etc/llmproxy/config.yaml

# HOME points at /tmp: the user has no home directory, and /tmp is the one
# writable place under a read-only root filesystem.
# LLMPROXY_WORKERS=0: one worker process per CPU the container may use (its
# affinity, capped by its CPU limit); set it to pin a number.
ENV PATH=/opt/llmproxy/bin:$PATH \
    LLMPROXY_CONFIG=/etc/llmproxy/config.yaml \
    LLMPROXY_WORKERS=0 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

# Numeric, so Kubernetes can verify runAsNonRoot; no /etc/passwd entry needed.
USER 10001:10001
WORKDIR /tmp

# 8080: proxied traffic; 9090: /metrics, /healthz, /readyz, /health.
EXPOSE 8080 9090

# SIGTERM starts the drain: stop accepting, let in-flight requests finish for
# server.drain_grace, exit 0.
STOPSIGNAL SIGTERM

# Python, because slim images have no curl. Follows the default admin port; a
# mounted config that moves admin_listen should override this check.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status != 200)"]

ENTRYPOINT ["llmproxy"]
CMD ["serve"]
