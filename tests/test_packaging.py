"""pyproject.toml and environment.yml list the same packages; the CI script runs the tests."""
import json
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from contsup.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda name where they differ


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].strip().lower()


def test_environment_yml_lists_what_pyproject_lists():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_names = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        pip_names |= {_name(r) for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_names = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert {CONDA_NAMES.get(n, n) for n in pip_names} == conda_names


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_committed_notebooks_show_their_results_and_pin_what_is_deterministic():
    """Every notebook opens with its papermill parameters and is committed executed (the
    quick profile's outputs, `make demo`), without an error output and under 2 MB; the cells
    nbval compares (NBVAL_CHECK_OUTPUT) carry small text outputs."""
    import json
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert [p.name[:2] for p in notebooks] == ["00", "01", "02", "03", "04", "05"]
    pinned = 0
    for path in notebooks:
        assert path.stat().st_size < 2_000_000, path.name
        cells = json.loads(path.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert "parameters" in code[0]["metadata"].get("tags", []), path.name
        assert any(c["outputs"] for c in code), f"{path.name} is committed without outputs (run make demo)"
        assert not any(o["output_type"] == "error" for c in code for o in c["outputs"]), path.name
        for cell in code:
            if "NBVAL_CHECK_OUTPUT" in "".join(cell["source"]):
                assert cell["outputs"] and cell["execution_count"] is not None, path.name
                assert len(json.dumps(cell["outputs"])) < 4000
                assert all(o["output_type"] == "stream" for o in cell["outputs"])
                pinned += 1
    assert pinned >= 5


def test_published_notebook_keeps_the_injected_parameters_and_loses_papermills_bookkeeping(tmp_path):
    from contsup.study import publish
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "k = 4", "outputs": []},
                    {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]},
                     "source": "# Parameters\nk = 8\nout = \"/home/me/contsup/results/quick\"\n", "outputs": []},
                    {"cell_type": "code", "metadata": {"papermill": {"duration": 1.0}}, "source": "print(k)",
                     "outputs": [{"output_type": "stream", "name": "stdout", "text": "8\n"}]}],
          "metadata": {"papermill": {"parameters": {"k": 8}}, "kernelspec": {"name": "python3"}}}
    publish.write(nb, tmp_path / "x.ipynb", root="/home/me/contsup")
    out = json.loads((tmp_path / "x.ipynb").read_text())
    injected = out["cells"][1]
    assert out["cells"][0]["source"] == "k = 4" and out["cells"][2]["source"] == "print(k)"
    assert injected["metadata"]["tags"] == ["injected-parameters", "nbval-skip"]
    assert "".join(injected["source"]) == publish.INJECTED_NOTE + '# Parameters\nk = 8\nout = "../results/quick"\n'
    assert "papermill" not in out["metadata"] and "papermill" not in out["cells"][2]["metadata"]
    assert out["cells"][2]["outputs"][0]["text"] == "8\n"   # the outputs stay
    publish.write(out, tmp_path / "x2.ipynb", root="/home/me/contsup")   # published twice: one note
    assert json.loads((tmp_path / "x2.ipynb").read_text())["cells"][1]["source"] == injected["source"]
    publish.write({**nb, "cells": [{"cell_type": "code", "metadata": {}, "source": "print(path)", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": ["/home/me/contsup/figures/a.png\n"]}]}]},
        tmp_path / "z.ipynb", root="/home/me/contsup")
    assert json.loads((tmp_path / "z.ipynb").read_text())["cells"][0]["outputs"][0]["text"] == ["figures/a.png\n"]
    big = {**nb, "cells": nb["cells"] + [{"cell_type": "code", "metadata": {}, "source": "",
                                          "outputs": [{"output_type": "stream", "name": "stdout",
                                                       "text": "x" * 2_100_000}]}]}
    with pytest.raises(UsageError, match="2 MB"):
        publish.write(big, tmp_path / "y.ipynb")
    assert not (tmp_path / "y.ipynb").exists()


def _code_cell(source: str, tags=()) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {"tags": list(tags)},
            "outputs": [], "source": source}


def test_a_tiny_notebook_published_shows_its_parameters_and_nbval_runs_its_defaults(tmp_path, monkeypatch):
    """Executed by papermill with injected values, published by `publish.publish`: the stored
    notebook shows the injected values (paths relative to its folder) over the outputs they
    made; nbval, run on the stored notebook as the tests run the real ones, skips that cell
    and runs the parameters cell's defaults (both runs record what they ran with)."""
    import subprocess
    import sys
    papermill = pytest.importorskip("papermill", reason="papermill (the dev extra) executes the notebook")
    from contsup.study import publish
    notebooks, executed, results = tmp_path / "notebooks", tmp_path / "executed", tmp_path / "results"
    for folder in (notebooks, executed, results):
        folder.mkdir()
    defaults = tmp_path / "defaults"
    defaults.mkdir()
    cells = [_code_cell(f'profile = "smoke"\nresults_dir = "{defaults}"', ["parameters"]),
             _code_cell('from pathlib import Path\n'
                        'Path(results_dir, "ran_with.txt").write_text(profile)\nprint(profile)'),
             _code_cell("# NBVAL_CHECK_OUTPUT\nprint(2 + 2)")]
    tiny = {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}},
            "nbformat": 4, "nbformat_minor": 4}
    (notebooks / "tiny.ipynb").write_text(json.dumps(tiny))
    papermill.execute_notebook(str(notebooks / "tiny.ipynb"), str(executed / "tiny.ipynb"),
                               parameters={"profile": "quick", "results_dir": str(results)},
                               kernel_name="python3", progress_bar=False, cwd=str(notebooks))
    monkeypatch.setattr(publish, "RUN_NOW", ())
    monkeypatch.setattr(publish, "FROM_REPRODUCE", ("tiny.ipynb",))
    assert publish.publish(executed, notebooks, lambda src, dst, params: None) == [notebooks / "tiny.ipynb"]

    stored = json.loads((notebooks / "tiny.ipynb").read_text())["cells"]
    injected = "".join(stored[1]["source"])
    assert stored[1]["metadata"]["tags"] == ["injected-parameters", "nbval-skip"]
    assert 'profile = "quick"' in injected and 'results_dir = "../results"' in injected
    assert str(tmp_path) not in injected
    assert "".join(stored[2]["outputs"][0]["text"]) == "quick\n" and (results / "ran_with.txt").read_text() == "quick"

    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          "-o", "addopts=", "--rootdir", str(tmp_path), "--nbval-lax", str(notebooks / "tiny.ipynb")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (defaults / "ran_with.txt").read_text() == "smoke"


def test_committed_notebooks_keep_the_parameters_that_produced_their_outputs():
    """`make demo` publishes the notebooks `reproduce` executed with injected parameters
    (publish.FROM_REPRODUCE) with papermill's injected cell kept right under the parameters
    cell: it sets the quick profile, only names the parameters cell defines, no machine's
    path, and nbval skips it. The notebooks executed with their own defaults
    (publish.RUN_NOW) have no injected cell: their parameters cell made their outputs."""
    import ast
    from contsup.study import publish
    names = lambda source: {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)  # noqa: E731
                            for t in node.targets if isinstance(t, ast.Name)}
    assert {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} == set(publish.RUN_NOW + publish.FROM_REPRODUCE)
    for name in publish.RUN_NOW + publish.FROM_REPRODUCE:
        code = [c for c in json.loads((ROOT / "notebooks" / name).read_text())["cells"] if c["cell_type"] == "code"]
        injected = [i for i, c in enumerate(code) if "injected-parameters" in c["metadata"].get("tags", [])]
        if name in publish.RUN_NOW:
            assert not injected, f"{name} is executed with its defaults; it should have no injected cell"
            continue
        assert injected == [1], f"{name}: no injected-parameters cell under its parameters cell (make demo)"
        source = "".join(code[1]["source"])
        assert "nbval-skip" in code[1]["metadata"]["tags"] and 'profile = "quick"' in source, name
        assert names(source) <= names("".join(code[0]["source"])), name
        assert not MACHINE_TEXT[0][1].search(source), name


MACHINE_TEXT = [("an absolute path", re.compile(r"(?<![\w.])/(tmp|home|work|root|Users|var/folders)/")),
                ("an installed package's path", re.compile(r"site-packages")),
                ("a warning", re.compile(r"\w*Warning:")),
                ("a terminal escape code", re.compile(r"\x1b|\[A\b"))]


def test_committed_notebook_outputs_name_no_machine_and_carry_no_debris():
    """What a reader sees in the committed notebooks: no machine's folders (temporary run
    folders, the checkout, site-packages), no warnings, no terminal debris of nested progress
    bars. Every text output is scanned (streams, text/plain, text/html)."""
    found = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            for out in cell.get("outputs", []):
                texts = [out.get("text", "")] + [out.get("data", {}).get(kind, "")
                                                 for kind in ("text/plain", "text/html", "text/markdown")]
                text = "".join("".join(t) if isinstance(t, list) else t for t in texts)
                found += [f"{path.name} cell {i}: {what}: {m.group(0)!r}"
                          for what, pattern in MACHINE_TEXT for m in [pattern.search(text)] if m]
    assert not found, "\n".join(found)


CITATION = re.compile(r"METHOD(?:\.md)?(?:\]\([^)\s]*\))?\s+(§\d+(?:\s*(?:[-–,]|and)\s*§?\d+)*)")
SKIP_DIRS = {".git", ".venv", "data", "results", "runs", "build", "__pycache__", ".ipynb_checkpoints"}


def _cited_sections(text: str) -> set[int]:
    """The section numbers of every "METHOD §n" citation in `text`; a range §2-§4 names
    every section from its first to its last."""
    found = set()
    for m in CITATION.finditer(text):
        for part in re.split(r"\s*(?:,|and)\s*", m.group(1)):
            ends = [int(n) for n in re.findall(r"\d+", part)]
            found |= set(range(ends[0], ends[-1] + 1))
    return found


def test_every_cited_method_section_is_a_heading_of_method_md():
    """The code, tests, notebooks and docs cite the method document as "METHOD §n" (or
    "METHOD.md §n"); each cited section must be a heading of METHOD.md, and the old
    citations of a document outside the repository are gone."""
    headings = {int(n) for n in re.findall(r"^#{2,3} §(\d+)\b", (ROOT / "METHOD.md").read_text(), re.M)}
    assert headings >= set(range(1, 11)), sorted(headings)
    assert _cited_sections("x (METHOD §2-§4), METHOD.md §1–§3 and [METHOD.md](../METHOD.md) §6, §8") \
        == {1, 2, 3, 4, 6, 8}
    cited, stale = {}, []
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if path.suffix not in {".py", ".md", ".ipynb", ".toml", ".cff"} or SKIP_DIRS & parts:
            continue
        text = path.read_text(encoding="utf-8")
        for n in _cited_sections(text):
            cited.setdefault(n, []).append(str(path.relative_to(ROOT)))
        stale += [str(path.relative_to(ROOT))] if re.search(r"\bSPEC §", text) else []
    missing = {n: files for n, files in cited.items() if n not in headings}
    assert not missing, f"cited sections without a heading in METHOD.md: {missing}"
    assert len(cited) >= 8 and not stale, (sorted(cited), stale)


def test_licence_and_citation_name_the_paper_and_agree_with_pyproject():
    """LICENSE is the MIT licence pyproject declares; CITATION.cff parses, describes this
    software and prefers the paper (arXiv 2312.07636), which the README links with the
    authors' code."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["license"] == project["license"] and cff["version"] == project["version"]
    paper = cff["preferred-citation"]
    assert paper["title"].startswith("Go beyond End-to-End Training")
    assert [a["family-names"] for a in paper["authors"]] == ["Yu", "Zhang", "Ma", "Wang", "Li"]
    assert "2312.07636" in paper["url"] and any("2312.07636" in i["value"] for i in paper["identifiers"])
    readme = (ROOT / "README.md").read_text()
    for link in ("https://arxiv.org/abs/2312.07636", "https://github.com/Tab-ct/ContSup", "CITATION.cff"):
        assert link in readme, link


def _make_dry_run(target: str) -> str:
    import shutil
    import subprocess
    if shutil.which("make") is None:
        pytest.skip("no `make` on this machine: the Makefile's targets cannot be dry-run")
    # run as from a shell, also when the tests themselves run under `make test` (a nested make
    # would print "Entering directory" lines and inherit the outer make's flags)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(["make", "--no-print-directory", "--dry-run", "--always-make", target], cwd=ROOT,
                          check=True, capture_output=True, text=True, env=env).stdout


def test_make_venv_builds_the_environment_and_nothing_else_and_lab_starts_as_root():
    """`make venv` installs .venv and runs nothing (no tests, no reproduction, no server);
    `make lab` passes --allow-root exactly when it runs as root."""
    venv = _make_dry_run("venv")
    assert "-m venv .venv" in venv and "pip install" in venv and venv.strip().endswith("touch .venv/.installed")
    assert not re.search(r"pytest|reproduce|jupyter lab", venv), venv
    lab = _make_dry_run("lab").strip().splitlines()[-1]
    assert "jupyter lab" in lab and ("--allow-root" in lab) == (os.geteuid() == 0), lab


def test_readme_set_up_block_can_be_pasted_in_order():
    """The README's first command block names `make venv`, activates .venv before the first
    `python -m contsup` line and ends with the one command that blocks (`make lab`)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands[0] == "make venv" and commands[-1] == "make lab", commands
    assert commands.index("source .venv/bin/activate") < min(
        i for i, c in enumerate(commands) if c.startswith("python -m contsup")), commands
    # both long commands come with an approximate duration (measured, in minutes)
    prose = " ".join(readme.split())
    assert re.search(r"`make test` takes about \d+ minutes", prose), "README: how long make test takes"
    assert re.search(r"`make demo` about \d+ minutes", prose), "README: how long make demo takes"
