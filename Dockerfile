# The mirror as a small, non-root image:
#   docker build -t mirror .
#   docker run -p 8083:8083 -v mirror-data:/var/lib/mirror mirror
# Configuration: /etc/mirror/config.yaml (deploy/config.example.yaml; mount your own over it).
#
# BASE: any Debian-like image with python3 (3.11+), python3's venv module with ensurepip,
# and groupadd/useradd; both stages use it, since the venv links to the base's python3.
# Offline: a wheelhouse in ./wheels (every wheel requirements/runtime.txt names, e.g. by
# pip download --no-deps) is installed from with no index, so the build needs no network.
# (No `# syntax=` line: BuildKit would pull that frontend image first.)
ARG BASE=python:3.11-slim

# --- build: the mirror and its dependencies, installed into a venv ----------------------
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# The context is what .dockerignore lets through: pyproject.toml, README.md, requirements/,
# mirror/, deploy/config.example.yaml and, when present, wheels/.
COPY . .
# Every dependency, and setuptools to build with, from the lock (exact versions, hashes
# checked); then the mirror itself, with nothing more fetched.
RUN python3 -m venv /opt/mirror \
    && if [ -d wheels ]; then set -- --no-index --find-links wheels; fi \
    && /opt/mirror/bin/pip install -q "$@" --require-hashes -r requirements/runtime.txt \
    && /opt/mirror/bin/pip install -q "$@" --no-deps --no-build-isolation . \
    && /opt/mirror/bin/pip uninstall -y -q pip setuptools wheel

# --- runtime: the venv, .pyc included (the root filesystem may be read-only) ------------
FROM ${BASE}
LABEL org.opencontainers.image.title="mirror" \
      org.opencontainers.image.description="A pull-through caching mirror for container registries"
# PATH in full: an imported base (docker import) has no PATH of its own to extend.
ENV PATH=/opt/mirror/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MIRROR_CONFIG=/etc/mirror/config.yaml
RUN groupadd --system --gid 10001 mirror \
    && useradd --system --uid 10001 --gid mirror --home-dir /var/lib/mirror \
       --no-create-home --shell /usr/sbin/nologin mirror \
    && mkdir -p /var/lib/mirror /etc/mirror \
    && chown mirror:mirror /var/lib/mirror
COPY --from=build /opt/mirror /opt/mirror
COPY deploy/config.example.yaml /etc/mirror/config.yaml

USER 10001:10001
WORKDIR /var/lib/mirror
VOLUME /var/lib/mirror
EXPOSE 8083

# No curl in a slim image: the mirror's own python asks /healthz, on the address the mirror
# listens on (its --listen, else MIRROR_LISTEN, else `listen` of its config file).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "mirror.healthcheck"]

ENTRYPOINT ["mirror"]
CMD ["serve", "--config", "/etc/mirror/config.yaml"]
