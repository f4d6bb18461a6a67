"""Refresh the committed notebooks with the outputs of a reproduction (`make demo`).

`reproduce --profile quick --publish-notebooks` ends here: the executed copies of notebooks
01, 03 and 04 in `<out>/notebooks/`, plus 00 and 02 executed now with their own defaults,
are written back to `notebooks/`, so that a reader sees figures and numbers on GitHub.

Each copy keeps papermill's `injected-parameters` cell, so that a reader sees the values that
produced the outputs (`profile = "quick"`, the results folder) right under the `parameters`
cell's small defaults; its paths are written relative to the notebook's folder, and a comment
says where it came from. The cell is tagged `nbval-skip`: nbval re-runs the stored notebooks
top to bottom in the tests, and with that cell skipped it runs them with the `parameters`
cell's smoke defaults, in the time the tests allow, without a results folder that a fresh
clone lacks, and without writing into `figures/`. nbval compares only the cells marked
`# NBVAL_CHECK_OUTPUT`, which print nothing that depends on the profile. Papermill's
bookkeeping metadata is dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError

MAX_BYTES = 2_000_000            # a notebook GitHub renders without trouble
RUN_NOW = ("00_walkthrough.ipynb", "02_train.ipynb")          # executed with their defaults (nothing injected)
FROM_REPRODUCE = ("01_information_motivation.ipynb", "03_tables.ipynb", "04_figures.ipynb")


def _relative(text, root: str):
    """Text outputs with the checkout's own path left out (`/home/x/contsup/figures/a.png`
    -> `figures/a.png`): the committed notebook names no machine's folders."""
    if isinstance(text, list):
        return [_relative(t, root) for t in text]
    return text.replace(root + "/", "").replace(root, ".") if isinstance(text, str) else text


INJECTED = "injected-parameters"      # papermill's tag of the cell it adds after `parameters`
SKIP = "nbval-skip"                   # nbval's tag of a cell it does not run
INJECTED_NOTE = ("# Injected by papermill when `make demo` ran this notebook: the values that produced\n"
                 "# the outputs below. The tests (nbval) skip this cell and run the defaults above.\n")


def _injected(cell: dict, root: str | None) -> dict:
    """Papermill's injected-parameters cell as published: tagged nbval-skip, with a note on
    where it came from, its paths relative to the notebook's folder (`root`/notebooks)."""
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    if root:
        source = source.replace(root + "/", "../").replace(root, "..")
    tags = cell["metadata"]["tags"]
    source = source if source.startswith(INJECTED_NOTE) else INJECTED_NOTE + source
    return {**cell, "source": source.splitlines(keepends=True),
            "metadata": {**cell["metadata"], "tags": tags + [SKIP] * (SKIP not in tags)}}


def clean(nb: dict, root: str | None = None) -> dict:
    """The notebook with papermill's injected parameters kept for the reader (but skipped by
    nbval) and its bookkeeping metadata dropped; given the checkout's `root`, without that
    path in its text outputs and injected parameters."""
    cells = [_injected(c, root) if INJECTED in c.get("metadata", {}).get("tags", []) else c for c in nb["cells"]]
    for c in cells:
        c.get("metadata", {}).pop("papermill", None)
        c.get("metadata", {}).pop("execution", None)
        for o in c.get("outputs", []) if root else []:
            if "text" in o:
                o["text"] = _relative(o["text"], root)
            if "text/plain" in o.get("data", {}):
                o["data"]["text/plain"] = _relative(o["data"]["text/plain"], root)
    meta = {k: v for k, v in nb.get("metadata", {}).items() if k != "papermill"}
    return {**nb, "cells": cells, "metadata": meta}


def write(nb: dict, path: Path, root: str | None = None) -> None:
    text = json.dumps(clean(nb, root), indent=1, ensure_ascii=False) + "\n"
    if len(text.encode()) > MAX_BYTES:
        raise UsageError(f"{path.name} would be {len(text.encode()) / 1e6:.1f} MB with its outputs "
                         f"(limit {MAX_BYTES / 1e6:.0f} MB); not published")
    path.write_text(text)


def publish(executed_dir: Path, notebooks_dir: Path, execute) -> list[Path]:
    """Write the executed notebooks into `notebooks_dir`. `execute(src, dst, parameters)`
    runs a notebook (None on success, else a one-line error); it runs RUN_NOW first.
    Returns the notebooks written; a notebook that failed or was not executed is left as
    it is, with a note."""
    executed_dir, written = Path(executed_dir), []
    for name in RUN_NOW:
        error = execute(notebooks_dir / name, executed_dir / name, {})
        if error:
            print(f"note: {name} failed ({error}); the committed copy is left as it is")
    for name in RUN_NOW + FROM_REPRODUCE:
        src = executed_dir / name
        if not src.exists():
            print(f"note: no executed {name} in {executed_dir}; the committed copy is left as it is")
            continue
        nb = json.loads(src.read_text())
        if any(o.get("output_type") == "error" for c in nb["cells"] for o in c.get("outputs", [])):
            print(f"note: {name} ended in an error; the committed copy is left as it is")
            continue
        write(nb, notebooks_dir / name, str(Path(notebooks_dir).resolve().parent))
        written.append(notebooks_dir / name)
    return written
