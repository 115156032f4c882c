# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (Python and Debian packages) when missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipkit-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

# Debian packages: chromium drives the search page test; openclipart gives real clip-art;
# oxygen-icon-theme (~38 MB) the out-of-domain icon set (data_tools/build_ood_icons.py).
# npm packs the glyph icon sets (data_tools/build_glyphs.py); it is installed only where no npm
# is on PATH (a Node.js from elsewhere brings its own).
DEBS := chromium openclipart-png openclipart-svg oxygen-icon-theme

.PHONY: demo test bench lint debs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@# A Debian python3 without ensurepip needs python3-venv before it can make a venv.
	@test -x $(PY) || python3 -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  $(MAKE) --no-print-directory debs DEBS=python3-venv && python3 -m venv $(VENV); }
	$(PY) -m pip install -q -e ".[test,ray]"
	# animal-mnist pins heavy, unused dependencies: its data is all we read.
	$(PY) -m pip install -q --no-deps animal-mnist
	@touch $(STAMP)

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: $(STAMP) debs
	$(VENV)/bin/clipkit demo

test: $(STAMP) debs
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: $(STAMP) debs
	$(VENV)/bin/pytest -q -m slow -p no:cacheprovider
	bash benchmarks/run_all.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check clipkit data_tools tests benchmarks
	$(VENV)/bin/ruff format --check clipkit data_tools tests benchmarks

clean:
	rm -rf runs data/.tmp
