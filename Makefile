# Two commands do all the set-up: `make demo` and `make test`. Both are idempotent: a second run
# skips what is installed (stamps under .venv/ and node_modules/ record what was done).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JS_SOURCES := $(wildcard js/*.js)
JS_BUNDLES := $(patsubst js/%.js,multiviz_widgets/static/%.js,$(JS_SOURCES))
PORT ?= 8888

.PHONY: all install deps js chromium test test-fast demo benchmarks clean constraints

all: install

# a venv that failed half-way (Debian without python3-venv leaves a python without pip) is
# removed, so that the next run makes it again instead of failing on it
$(PY):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

# Python dependencies (torch pinned to the CPU build on disk), then the package itself (editable).
# constraints.txt holds every package of the environment the tests passed in (what the pinned
# ones pull in too), so that a fresh machine installs the same versions, not the newest.
# (a newer pip is welcome, not needed: offline, as in a classroom after a `git pull`, the pinned
# packages already there still install)
# A venv made without pip (`uv venv`, `python3 -m venv --without-pip`) gets it from Python's own
# ensurepip (offline); where that is missing too, the message says how to make the venv again.
$(VENV)/.deps-stamp: requirements.txt constraints.txt setup.py | $(PY)
	@$(PIP) --version >/dev/null 2>&1 || $(PY) -m ensurepip --upgrade >/dev/null 2>&1 || { \
		echo "$(VENV) has no pip, and its Python cannot install one (ensurepip is missing):"; \
		echo "remove it (rm -rf $(VENV)) and run make again, which makes it with"; \
		echo "'$(PYTHON) -m venv' (on Debian or Ubuntu: sudo apt-get install python3-venv)."; \
		exit 1; }
	$(PIP) install -q --upgrade pip || echo "pip not upgraded (PyPI unreachable?): going on"
	$(PIP) install -q -r requirements.txt -c constraints.txt
	$(PIP) install -q --no-deps -e .
	touch $@

# exactly the versions of package-lock.json (npm ci never rewrites it)
node_modules/.stamp: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# one build makes every bundle (a grouped target: `make -j` runs it once, not once per bundle)
$(JS_BUNDLES) &: $(JS_SOURCES) $(wildcard js/lib/*.js) node_modules/.stamp
	npm run build

js: $(JS_BUNDLES)

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y chromium

chromium: $(CHROMIUM)

deps: $(VENV)/.deps-stamp

# after changing requirements.txt: install it without the old constraints (a raised pin would
# conflict with them), then write the environment as it now is
constraints: | $(PY)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	$(PIP) freeze --exclude-editable > constraints.txt.freeze
	grep -q '==' constraints.txt.freeze
	{ sed -n '/^#/!q;p' constraints.txt; \
		sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' constraints.txt.freeze; } > constraints.txt.new
	rm constraints.txt.freeze
	mv constraints.txt.new constraints.txt
	touch $(VENV)/.deps-stamp

install: deps js

# Every test: kernels, engine, views, notebooks and the browser tests.
test: install chromium
	MVZ_FULL_TEST=1 $(PY) -m pytest tests -q -p no:cacheprovider

# The same without the browser and notebook tests (marked "browser" / "notebook").
test-fast: install
	$(PY) -m pytest tests -q -p no:cacheprovider -m "not browser and not notebook"

# glibc malloc settings for the demo's server and its notebook kernels: keep blocks up to 32 MiB on
# the heap instead of mmapping (and page-faulting) every batch anew. In fresh processes LIME and
# KernelSHAP ran 1.5 to 1.9x faster with them (python benchmarks/allocator.py; README).
DEMO_MALLOC := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456

# JupyterLab on 127.0.0.1, serving the repository, with the quickstart notebook (the Explorer on
# easy-VQA) at the URL it prints and at the server's root URL. notebooks/.demo-settings holds
# JupyterLab's defaults for the demo (no prompt about news or updates on a projector); voila's
# and the language servers' extensions are not loaded (the demo uses neither, and their start-up
# warnings looked like errors).
DEMO_URL := http://127.0.0.1:$(PORT)/lab/tree/notebooks/quickstart.ipynb
# A port in use (an earlier `make demo` still running, another server) is said before the URL
# is printed: the server would fail after it, and the URL open another server's page.
demo: install
	@$(PY) -c "import socket; s = socket.socket(); \
		s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $(PORT)))" \
		2>/dev/null || { echo "Port $(PORT) cannot be used: another server (an earlier"; \
		echo "'make demo' still running?) holds it. Stop that one, or choose another port:"; \
		echo "make demo PORT=8890"; exit 1; }
	@echo ""
	@echo "  Open $(DEMO_URL) in a browser on this machine,"
	@echo "  then choose Run > Run All Cells: the Explorer on easy-VQA appears"
	@echo "  under the first code cell."
	@echo "  Press Ctrl-C here (twice) to stop the server."
	@echo ""
	$(DEMO_MALLOC) $(VENV)/bin/jupyter lab --no-browser --ip=127.0.0.1 --port=$(PORT) --ServerApp.port_retries=0 \
		--ServerApp.open_browser=False --IdentityProvider.token= $(if $(filter 0,$(shell id -u)),--allow-root,) \
		--ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks/quickstart.ipynb \
		--LabApp.app_settings_dir="$(CURDIR)/notebooks/.demo-settings" \
		--ServerApp.jpserver_extensions="{'voila.server_extension': False, 'jupyter_lsp': False}" \
		--LabApp.news_url=None --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate

# Every benchmark, each writing benchmarks/results/NAME.json (kernels.py runs kernels_stage2 too;
# common.py is their helpers; kernels_gpu.py runs where torch sees a CUDA device).
BENCHMARKS := easy_vqa_model faithfulness kernels cold_cache allocator emap_scale representations ui_latency shapley_accuracy

benchmarks: install chromium
	for b in $(BENCHMARKS); do $(PY) benchmarks/$$b.py || exit 1; done
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) benchmarks/kernels_gpu.py; fi

clean:
	rm -rf $(VENV) node_modules multiviz_widgets/static/*.js build *.egg-info
