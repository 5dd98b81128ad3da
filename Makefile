# The README's two commands, and the pieces they are made of.
PYTHON ?= python3

.PHONY: install test test-deps lint typecheck clean

install:
	$(PYTHON) -m pip install .

# Installs everything the suite needs (the package built in place with its
# Cython core, the test extra, Debian's Chromium for the browser tests and
# redis-server for the broker tests), then
# runs the whole suite on both backends.
test: test-deps
	$(PYTHON) -m pytest

test-deps:
	FASTRELAY_BUILD_EXTENSION=yes $(PYTHON) -m pip install -e '.[test]'
	bash scripts/ensure-chromium.sh
	bash scripts/ensure-redis.sh
	# ip and tc build the slow-link network namespace of tests/netns.py.
	command -v tc >/dev/null && command -v ip >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2)

lint:
	$(PYTHON) -m ruff check fastrelay tests bench

typecheck:
	$(PYTHON) -m mypy

clean:
	rm -rf build dist *.egg-info fastrelay/_core.c fastrelay/_hub_c.c fastrelay/*.so
