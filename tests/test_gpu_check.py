"""benchmarks/gpu_check.py on a machine without a GPU: it refuses in one line (exit 2), and
its bookkeeping -- time budgets, the results' file names, JSON and markdown -- works on a
small made-up result. Its measuring code needs CUDA (events, max_memory_allocated, sync
debug mode) and runs where there is one."""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")
def test_no_gpu_one_line_exit_2():
    p = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("gpu_check: no CUDA GPU") and p.stderr.count("\n") == 1, p.stderr


def test_device_names_become_file_names():
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_check.slug("NVIDIA GeForce RTX 4090 (Laptop)") == "nvidia-geforce-rtx-4090-laptop"
    assert gpu_check.slug("??") == "gpu"


def test_a_section_out_of_time_skips_its_items_and_names_them(monkeypatch):
    def must_not_run(*args):
        raise AssertionError("measured past the budget")

    monkeypatch.setattr(gpu_check, "measure_row", must_not_run)
    spent = gpu_check.Budget(60, deadline=time.monotonic() - 1)   # the run's deadline has passed
    out = gpu_check.section_rows(gpu_check.step_items(), "cuda", spent, compiled=False)
    assert out["rows"] == [] and out["skipped_for_time"][0] == "E2E plain"
    assert len(out["skipped_for_time"]) == len(gpu_check.step_items()) == 11


def fake_result():
    row = {"mode": "R1E", "k": 16, "impl": "lean", "batch": 128, "first_step_s": 0.5, "step_s": 0.01,
           "images_per_s": 12800.0, "max_memory_allocated": 300 * 2**20, "cuda_peak_bytes": 200 * 2**20,
           "tracker_peak_bytes": 150 * 2**20}
    compiled = {**row, "impl": "compiled", "tracker_peak_bytes": None, "cuda_peak_bytes": None, "recompiles": 0,
                "graphs": 47, "graph_breaks": 0}
    return {"device": "NVIDIA Fake GPU 80GB", "gpus": 1,
            "steps": {"rows": [row, {"mode": "R16", "impl": "plain", "error": "OutOfMemoryError: boom"}],
                      "skipped_for_time": []},
            "syncs": {"steps": 8, "syncs": 1, "syncs_per_step": 0.125,
                      "where": ["train.py:300"], "messages": []},
            "calibrate": {"gpu_hours": 3.5, "runs": 99, "pflops": 991.2,
                          "archs": {"resnet32": {"tflops": 40.0, "images_per_s": 9000.0}}},
            "nccl": {"skipped": "1 GPU: needs two"},
            "ops": {"error": "RuntimeError: no kernel"}, "compiled": {"rows": [compiled], "skipped_for_time": ["E compiled"]},
            "nan_check": math.nan}


def test_results_json_and_markdown(tmp_path, capsys):
    json_path, md_path = gpu_check.write_results(fake_result(), tmp_path)
    assert json_path.name == "gpu_nvidia-fake-gpu-80gb.json" and md_path.name == "gpu_nvidia-fake-gpu-80gb.md"
    stored = json.loads(json_path.read_text())          # strict JSON: NaN written as null (jsonio)
    assert stored["nan_check"] is None and stored["steps"]["rows"][0]["images_per_s"] == 12800.0
    md = md_path.read_text().splitlines()
    assert "| R1E | lean | 12800 | 300 | 200 | 150 | 0.75 | 0.50 | - |" in md
    assert "| R1E | compiled | 12800 | 300 | - | - | - | 0.50 | 0 |" in md
    assert any(line.startswith("| R16 | plain | failed: OutOfMemoryError") for line in md)
    assert "Not measured (time budget): E compiled." in md
    assert "- syncs: 1 in an epoch of 8 steps of train.train_epoch under set_sync_debug_mode('warn') " \
           "(train.py:300)" in md
    assert any(line.startswith("- paper grid: 3.50 GPU-hours for 99 runs") for line in md)
    assert "- 2 NCCL ranks: 1 GPU: needs two" in md
    assert "- sections failed: ops: RuntimeError: no kernel" in md
    # --markdown prints the same table from the JSON, measuring nothing
    assert gpu_check.main(["--markdown", str(json_path)]) == 0
    assert capsys.readouterr().out.splitlines() == md


def test_checkpoint_tensors_are_found_by_path():
    ckpt = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(2)}},
                                                          "param_groups": [{"lr": 0.1}]},
            "epoch": 3, "torch_rng": torch.zeros(3, dtype=torch.uint8)}
    found = gpu_check.tensors(ckpt)
    assert sorted(found) == ["model/w", "optimizer/state/0/momentum_buffer", "torch_rng"]
    assert found["model/w"] is ckpt["model"]["w"]
