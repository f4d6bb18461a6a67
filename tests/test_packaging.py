"""pyproject.toml and environment.yml list the same packages; the CI script runs the tests."""
import re
import tomllib
from pathlib import Path

import yaml

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


def test_committed_notebooks_store_only_pinned_outputs():
    """nbval compares only stored outputs: the NBVAL_CHECK_OUTPUT cells carry theirs (small
    text), every other cell none, and each notebook opens with its papermill parameters."""
    import json
    from pathlib import Path
    notebooks = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
    pinned = 0
    for path in notebooks:
        code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert "parameters" in code[0]["metadata"].get("tags", []), path.name
        for cell in code:
            is_pinned = "NBVAL_CHECK_OUTPUT" in "".join(cell["source"])
            if not is_pinned:
                assert cell["outputs"] == [], f"{path.name}: unpinned cell with stored output"
            else:
                assert cell["outputs"] and cell["execution_count"] is not None, path.name
                assert len(json.dumps(cell["outputs"])) < 4000
                assert all(o["output_type"] == "stream" for o in cell["outputs"])
                pinned += 1
    assert pinned >= 3
