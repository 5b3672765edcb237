# The two commands a newcomer needs: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Real components the tests start themselves (Debian packages).
SYSTEM_PACKAGES := redis-server redis-sentinel redis-tools docker-registry docker.io containerd runc skopeo busybox-static prometheus \
	chromium \
	nginx-light wrk curl \
	ceph-mon ceph-osd radosgw ceph-common haproxy \
	openssl util-linux strace
SYSTEM_COMMANDS := redis-server redis-sentinel redis-cli docker-registry dockerd containerd skopeo busybox nginx wrk prometheus promtool \
	chromium curl \
	ceph-mon ceph-osd radosgw ceph haproxy \
	openssl unshare strace
# The image test: a Debian base made with debootstrap, and the compose file started by
# docker-compose (1.29, Python; Debian packages no `docker compose` v2).
SYSTEM_PACKAGES += debootstrap docker-compose
SYSTEM_COMMANDS += debootstrap docker-compose

.PHONY: all install system-deps run test test-unit test-e2e bench soak lint format mypy lock clean

all: lint mypy test

# Every Python package comes from the lock (requirements/*.txt, exact versions with hashes),
# so a new release upstream changes nothing here until `make lock` is committed. The project
# itself goes in editable, with no build isolation: setuptools comes from the lock too.
LOCK_INSTALL = $(PY) -m pip install -q --require-hashes -r
PROJECT_INSTALL = $(PY) -m pip install -q --no-deps --no-build-isolation -e .

$(VENV)/.installed: requirements/test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(LOCK_INSTALL) requirements/test.txt
	$(PROJECT_INSTALL)
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

# Port 8083 unless PORT is given (make run PORT=9000); a config in MIRROR_CONFIG keeps its
# own storage, and its own listen when PORT is not given. Order: flag, environment, file.
run: install
	$(VENV)/bin/mirror serve $(if $(PORT),--listen 0.0.0.0:$(PORT)) \
		$(if $(MIRROR_CONFIG)$(MIRROR_STORAGE),,--storage ./mirror-data)

test: install system-deps lint mypy
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest -m "not e2e"

test-e2e: install system-deps
	$(PY) -m pytest -m e2e -s

# The bench extra (matplotlib for the chart, py-spy for --profile) on top of the test one.
$(VENV)/.bench-installed: $(VENV)/.installed requirements/bench.txt
	$(LOCK_INSTALL) requirements/bench.txt
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

# Refreshes the lock: the newest releases within pyproject.toml's ranges, for Python 3.11 on
# any platform. Commit the result like any change, after `make test` passed on it.
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml requirements/build.in --universal \
	--python-version 3.11 --generate-hashes --quiet --custom-compile-command "make lock"
lock: install
	UV_NO_CONFIG=1 $(UV_COMPILE) --upgrade -o requirements/runtime.txt
	UV_NO_CONFIG=1 $(UV_COMPILE) --upgrade --extra test -c requirements/runtime.txt -o requirements/test.txt
	UV_NO_CONFIG=1 $(UV_COMPILE) --upgrade --extra test --extra bench -c requirements/test.txt \
		-o requirements/bench.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info mirror-data
