# Every target does its own set-up: a virtual environment in .venv with the project installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test chromium bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "solarfleet needs Python 3.11 or newer; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m collector.demo

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -rs

# The dashboard tests drive Debian's headless Chromium. Install it when it is missing and
# this is a root shell with apt-get; otherwise those tests skip and say why.
chromium:
	@if command -v chromium >/dev/null 2>&1; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the dashboard tests"; \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q chromium) \
		|| echo "chromium could not be installed: the dashboard tests will skip"; \
	else \
		echo "chromium is not on PATH and this shell cannot install it" \
			"(needs apt-get and root): the dashboard tests will skip"; \
	fi

# The suite, then the backlog drain, which writes its own section of docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python -m bench
	$(BIN)/python bench/drain.py

clean:
	rm -rf $(VENV) var .pytest_cache
