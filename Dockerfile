# syntax=docker/dockerfile:1
# The mirror as a small, non-root image:
#   docker build -t mirror .
#   docker run -p 8083:8083 -v mirror-data:/var/lib/mirror mirror
# Configuration: /etc/mirror/config.yaml (deploy/config.example.yaml; mount your own over it).

# --- build: a wheel of the mirror, installed with its dependencies into a venv ------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/mirror \
    && /opt/mirror/bin/pip install /wheels/mirror-*.whl \
    && /opt/mirror/bin/pip uninstall -y -q pip setuptools

# --- runtime: the venv, .pyc included (the root filesystem may be read-only) ------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="mirror" \
      org.opencontainers.image.description="A pull-through caching mirror for container registries"
ENV PATH=/opt/mirror/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
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

# No curl in the slim image: python asks /healthz (without any proxy from the environment).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8083/healthz', timeout=4)"]

ENTRYPOINT ["mirror"]
CMD ["serve", "--config", "/etc/mirror/config.yaml"]
