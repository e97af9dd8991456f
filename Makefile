# Two commands do everything on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.imgrec-installed

.PHONY: run test install lint bench clean

run: $(STAMP)  ## predict what is in the bundled sample photos with the offline ImageNet model
	$(BIN)/imgrec predict

test: $(STAMP)  ## the whole test suite
	$(BIN)/python -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
