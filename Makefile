# The two commands a newcomer needs: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Real components the tests start themselves (Debian packages).
SYSTEM_PACKAGES := redis-server redis-sentinel redis-tools docker-registry docker.io containerd runc skopeo busybox-static prometheus \
	chromium \
	nginx-light wrk curl \
	ceph-mon ceph-osd radosgw ceph-common haproxy \
	openssl util-linux
SYSTEM_COMMANDS := redis-server redis-sentinel redis-cli docker-registry dockerd containerd skopeo busybox nginx wrk prometheus promtool \
	chromium curl \
	ceph-mon ceph-osd radosgw ceph haproxy \
	openssl unshare
# The image test: a Debian base made with debootstrap, and the compose file started by
# docker-compose (1.29, Python; Debian packages no `docker compose` v2).
SYSTEM_PACKAGES += debootstrap docker-compose
SYSTEM_COMMANDS += debootstrap docker-compose

.PHONY: all install system-deps run test test-unit test-e2e bench soak lint format mypy clean

all: lint mypy test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Installs the Debian packages the tests need, only when one is missing.
system-deps:
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null 2>&1 || \
		[ -x /usr/sbin/$$c ] || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages (missing:$$missing)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$$SUDO apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	fi

run: install
	$(VENV)/bin/mirror serve --listen 0.0.0.0:8083 --storage ./mirror-data

test: install system-deps lint mypy
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest -m "not e2e"

test-e2e: install system-deps
	$(PY) -m pytest -m e2e -s

# The bench extra (matplotlib for the chart, py-spy for --profile) on top of the test one.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# The mirror vs distribution's proxy mode vs nginx, side by side (~6 min); not a test. It
# prints the table and writes bench-results/<time>/. E.g. BENCH_ARGS="--runs 1 --no-docker".
bench: $(VENV)/.bench-installed system-deps
	$(PY) -m tests.bench $(BENCH_ARGS)

# The soak is not a test either: 200 clients for 60 s; errors must be zero, memory flat.
soak: install system-deps
	$(PY) -m tests.soak

lint: install
	$(PY) -m ruff check mirror tests
	$(PY) -m ruff format --check mirror

format: install
	$(PY) -m ruff format mirror
	$(PY) -m ruff check --fix mirror tests

mypy: install
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info mirror-data
