# `make venv` builds .venv and nothing else; `make test` (the tests) and `make demo` (the quick
# reproduction of every table and figure on the embedded digits, CPU) build it first when it
# is missing. `make lab` opens the notebooks in JupyterLab, from the same .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lab clean

# One environment for everything: the package, the tests (dev) and JupyterLab (notebooks).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,notebooks]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python -m contsup reproduce --profile quick --publish-notebooks

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# JupyterLab refuses to start as root (a container's usual user) unless told it may: the flag
# is passed then, and only then.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)

lab: $(VENV)/.installed
	$(BIN)/jupyter lab $(ALLOW_ROOT) notebooks/00_walkthrough.ipynb

clean:
	rm -rf $(VENV) runs
