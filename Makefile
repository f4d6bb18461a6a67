# Two commands do all the set-up: `make demo` (install + the quick reproduction of every
# table and figure on the embedded digits, CPU) and `make test`. `make lab` opens the
# notebooks in JupyterLab, from the same .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lab clean

# One environment for everything: the package, the tests (dev) and JupyterLab (notebooks).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,notebooks]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m contsup reproduce --profile quick --publish-notebooks

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lab: $(VENV)/.installed
	$(BIN)/jupyter lab notebooks/00_walkthrough.ipynb

clean:
	rm -rf $(VENV) runs
