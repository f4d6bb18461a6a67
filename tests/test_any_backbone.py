"""Notebook 05 (ContSup on any backbone) and the two models it wraps (contsup/backbones.py)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

import contsup
from contsup.backbones import cifar_resnet18, small_vit
from contsup.study import publish

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_any_backbone.ipynb"


def test_notebook_05_opens_with_smoke_parameters_that_reproduce_can_replace():
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    assert "parameters" in cells[0]["metadata"].get("tags", [])
    assigned = {t.id: node.value.value for node in ast.parse("".join(cells[0]["source"])).body
                if isinstance(node, ast.Assign) for t in node.targets}
    # reproduce's analysis notebooks get exactly these three (run_notebooks)
    assert {"profile", "results_dir", "figures_dir"} <= set(assigned)
    assert assigned["profile"] == "smoke" and assigned["results_dir"] is None
    sizes = next("".join(c["source"]) for c in cells if "SIZES = {" in "".join(c["source"]))
    assert all(f'"{p}": dict(' in sizes for p in ("smoke", "quick", "paper"))   # every profile reproduce passes
    assert "05_any_backbone.ipynb" in publish.FROM_REPRODUCE


def test_nbval_collects_notebook_05():
    """pytest's testpaths include notebooks/ and addopts --nbval-lax: the notebook's cells are
    collected as tests (none ignored)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly",
                          str(NOTEBOOK)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    code_cells = sum(c["cell_type"] == "code" for c in json.loads(NOTEBOOK.read_text())["cells"])
    collected = [line for line in out.stdout.splitlines() if "05_any_backbone.ipynb::" in line]
    assert len(collected) == code_cells


def test_cifar_resnet18_has_the_cifar_stem_and_wraps_with_feature_map_cuts():
    model = cifar_resnet18(num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    net = contsup.wrap(model, cuts=["layer1", "layer2", "layer3"], mode="R1E", image_size=32)
    assert net.shapes[1:] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    x = torch.randn(2, 3, 32, 32)
    r0 = contsup.wrap(model, cuts=4, mode="R0", image_size=32).eval()
    assert torch.equal(r0(x), model.eval()(x))


def test_small_vit_cuts_carry_patch_tokens_and_a_class_token():
    net = contsup.wrap(small_vit(num_classes=10), cuts=4, mode="R1E", image_size=32)
    assert all(s == (65, 128) for s in net.shapes[1:])    # 8x8 patches of 4 px + the class token, width 128
