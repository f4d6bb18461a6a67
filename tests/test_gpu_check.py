"""benchmarks/gpu_check.py on a machine without a GPU: it refuses in one line (exit 2); its
schedule keeps the five minutes, run end to end on a fake clock with the CUDA calls stubbed
(each stub "takes" a given time on that clock); its bookkeeping -- the results' file names,
JSON and markdown -- works on a small made-up result. Its measuring code itself needs CUDA
(events, max_memory_allocated, sync debug mode) and runs where there is one."""
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


def fake_result():
    row = {"mode": "R1E", "k": 16, "impl": "lean", "dtype": "float32", "batch": 256, "first_step_s": 0.5, "step_s": 0.01,
           "images_per_s": 12800.0, "max_memory_allocated": 300 * 2**20, "cuda_peak_bytes": 200 * 2**20,
           "tracker_peak_bytes": 150 * 2**20}
    compiled = {**row, "impl": "compiled", "tracker_peak_bytes": None, "cuda_peak_bytes": None, "recompiles": 0,
                "graphs": 47, "graph_breaks": 0}
    return {"device": "NVIDIA Fake GPU 80GB", "gpus": 1,
            "steps": {"rows": [row, {"name": "R16 plain bfloat16", "error": "OutOfMemoryError: boom"}],
                      "skipped_for_time": []},
            "syncs": {"steps": 8, "syncs": 1, "syncs_per_step": 0.125, "impl": "plain",
                      "where": ["train.py:300"], "messages": []},
            "calibrate": {"gpu_hours": 3.5, "runs": 99, "pflops": 991.2,
                          "archs": {"resnet32": {"tflops": 40.0, "images_per_s": 9000.0}}},
            "nccl": {"skipped": "1 GPU: needs two"},
            "ops": {"error": "RuntimeError: no kernel"}, "compiled": {"rows": [compiled], "skipped_for_time": ["E compiled"]},
            "nan_check": math.nan,
            "time": {"total_s": 250.4, "deadline_s": 290, "sections": {"steps": {"s": 89.6, "allowed_s": 90.0}}}}


def test_results_json_and_markdown(tmp_path, capsys):
    json_path, md_path = gpu_check.write_results(fake_result(), tmp_path)
    assert json_path.name == "gpu_nvidia-fake-gpu-80gb.json" and md_path.name == "gpu_nvidia-fake-gpu-80gb.md"
    stored = json.loads(json_path.read_text())          # strict JSON: NaN written as null (jsonio)
    assert stored["nan_check"] is None and stored["steps"]["rows"][0]["images_per_s"] == 12800.0
    md = md_path.read_text().splitlines()
    assert "| R1E | lean | float32 | 12800 | 300 | 200 | 150 | 0.75 | 0.50 | - |" in md
    assert "| R1E | compiled | float32 | 12800 | 300 | - | - | - | 0.50 | 0 |" in md
    assert any(line.startswith("| R16 | plain | bfloat16 | failed: OutOfMemoryError") for line in md)
    assert "Not measured (time budget): E compiled." in md
    assert "- syncs: 1 in an epoch of 8 steps of train.train_epoch (plain encoders) under " \
           "set_sync_debug_mode('warn') (train.py:300)" in md
    assert any(line.startswith("- paper grid: 3.50 GPU-hours for 99 runs") for line in md)
    assert "- 2 NCCL ranks: 1 GPU: needs two" in md
    assert "- sections failed: ops: RuntimeError: no kernel" in md
    assert "- time: 250 s of 290 (steps 90/90 s)" in md
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


# --------------------------------------------------------------------------------------
# The schedule, end to end, on a fake clock: every CUDA call stubbed by one that "takes" a
# given time on that clock.
class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


# seconds of one step on the fake device, per mode and implementation (bfloat16: 0.8 times)
STEP_S = {("E2E", "plain"): 0.02, ("R0", "plain"): 0.05, ("E", "lean"): 0.5, ("E", "fused"): 0.12,
          ("E", "plain"): 0.08, ("R1E", "lean"): 0.6, ("R1E", "fused"): 0.15, ("R1E", "plain"): 0.1,
          ("R16", "lean"): 2.0, ("R16", "fused"): 0.3, ("R16", "plain"): 0.15}
SETUP_S, FIRST_S = 1.5, 0.3        # an eager row's model and tracker; the first step's extra (cuDNN's search)
START_S, GRAPH_S = 8.0, 1.5        # a compiled row's process start; each graph's compile
SECTION_S = {"calibrate": 45.0, "ops": {"R1E": 1.0, "R16": 3.0}, "syncs_setup": 3.0}


class FakeGpu:
    """Stands in for gpu_check's CUDA calls and subprocesses; records what ran."""

    def __init__(self, monkeypatch, clock, calibrate_s=SECTION_S["calibrate"], graph_s=GRAPH_S):
        self.clock, self.built, self.synced, self.calibrate_s, self.graph_s = clock, [], [], calibrate_s, graph_s
        for name in ("build_step", "step_seconds", "count_syncs", "count_ops", "run_bounded"):
            monkeypatch.setattr(gpu_check, name, getattr(self, name))
        for name, fn in {"reset_peak": lambda device: None, "peak_bytes": lambda device: 300 * 2**20,
                         "free_cached": lambda device: None, "gpu_count": lambda: 1}.items():
            monkeypatch.setattr(gpu_check, name, fn)

    def build_step(self, mode, impl, dtype, compiled, device):
        from torch._dynamo.utils import counters
        self.built.append((mode, impl, dtype, compiled))
        step = STEP_S[mode, impl] * (0.8 if dtype == "bfloat16" else 1.0)
        graphs = gpu_check.graph_count(mode)
        calls = []

        def one_step():   # the first step compiles (compiled) or searches cuDNN's algorithms
            if not calls and compiled:
                counters["stats"]["unique_graphs"] += graphs
                counters["frames"]["total"] += graphs
            self.clock.advance(step + (not calls) * (graphs * self.graph_s if compiled else FIRST_S))
            calls.append(step)
            return step
        self.clock.advance(START_S if compiled else SETUP_S)
        return one_step, ({} if compiled else {"tracker_peak_bytes": 2**20, "cuda_peak_bytes": 2**21})

    def step_seconds(self, one_step, device):
        return one_step()

    def count_syncs(self, device, impl, steps):
        self.synced.append(impl)
        self.clock.advance(SECTION_S["syncs_setup"] + 2 * steps * STEP_S["R1E", impl])
        return {"syncs": 0, "where": [], "messages": []}

    def count_ops(self, impl, mode, device):
        self.clock.advance(SECTION_S["ops"][mode])
        return 1000

    def run_bounded(self, cmd, timeout, cwd=None):
        t0 = self.clock()
        if "--compiled-row" in cmd:   # the child process, run here on the fake clock
            mode, dtype = cmd[cmd.index("--compiled-row") + 1].split(",")
            until = float(cmd[cmd.index("--until") + 1])
            row = gpu_check.measure_row((mode, "plain", dtype), gpu_check.Budget(until, self.clock), "cuda",
                                        compiled=True)
            out = {"rc": 0, "stdout": json.dumps(row) + "\n", "stderr": ""}
            took = self.clock() - t0
        else:                         # estimate --calibrate
            out = {"rc": 0, "stdout": json.dumps(fake_estimate()), "stderr": ""}
            took = self.calibrate_s
            self.clock.advance(took)
        if took > timeout:            # killed at its timeout
            self.clock.t = t0 + timeout
            return {"rc": None, "timed_out_after_s": round(timeout), "s": timeout}
        return {**out, "s": took}


def fake_estimate():
    return {"total": {"gpu_hours": 3.5, "runs": 99, "pflops": 991.2},
            "assumptions": {"calibration": {"archs": {"resnet32": {"flops_per_s": 4e13, "images_per_s": 9000.0,
                                                                   "config": {}}}}}}


def fake_run(monkeypatch, **fake):
    clock = FakeClock()
    gpu = FakeGpu(monkeypatch, clock, **fake)
    schedule = gpu_check.Schedule(clock=clock)
    result = gpu_check.run_sections(schedule, "cuda", {"device": "NVIDIA Fake GPU", "gpus": 1})
    return result, gpu


def test_the_schedule_keeps_five_minutes_on_a_fake_clock(monkeypatch, capsys):
    result, gpu = fake_run(monkeypatch)
    t = result["time"]
    print(gpu_check.markdown(result))
    assert list(t["sections"]) == ["steps", "syncs", "ops", "calibrate", "nccl", "compiled"]
    for name, v in t["sections"].items():                  # no section runs past its end
        assert v["s"] <= v["allowed_s"] + 1e-9, (name, v)
    assert t["total_s"] <= gpu_check.TOTAL_S <= 300
    assert sum(gpu_check.BUDGET_S.values()) == gpu_check.TOTAL_S

    steps = result["steps"]
    measured = [r["name"] for r in steps["rows"]]
    assert measured[:4] == ["E2E plain float32", "E2E plain bfloat16", "R0 plain float32", "R0 plain bfloat16"]
    assert any(r["dtype"] == "bfloat16" and r["mode"] == "R1E" for r in steps["rows"])   # bf16 beside float32
    # a row whose estimate did not fit was not started: listed with its estimate, never built
    assert steps["skipped_for_time"] and all("needs ~" in s for s in steps["skipped_for_time"])
    skipped = {tuple(s.split(" (")[0].split()) for s in steps["skipped_for_time"]}
    assert not skipped & {(m, i, d) for m, i, d, compiled in gpu.built if not compiled}
    # a started row is bounded: the last one measured stopped its timed steps at the section's end
    cut = [r for r in steps["rows"] if r["timed_steps"] < gpu_check.TIMED]
    assert cut, [(r["name"], r["timed_steps"]) for r in steps["rows"]]

    # syncs ran on the CUDA default encoders, not lean
    assert result["syncs"]["impl"] == gpu.synced[0] == "plain"
    # compiled: E2E first (2 graphs), then K=16 R1E (47 graphs) measured within the budget
    compiled = {r["name"]: r for r in result["compiled"]["rows"]}
    assert compiled["E2E compiled float32"]["graphs"] == 2
    assert compiled["R1E compiled float32"]["graphs"] == 47 and compiled["R1E compiled float32"]["recompiles"] == 0
    assert "step_s" in compiled["R1E compiled float32"]
    assert result["compiled"]["skipped_for_time"], "the later compiled rows did not fit in this scenario"
    out = capsys.readouterr().out
    assert "- time: " in out and "- aten ops per step, K=16 batch 256: R1E lean 1000, fused 1000, plain 1000; R16 " in out


def test_a_compiled_row_that_would_not_fit_is_skipped_and_says_why(monkeypatch):
    """Where inductor takes 3 s a graph, K=16 compiled (47 graphs at the seconds per graph E2E's
    compile took) does not fit in what is left: it is not started and the result says what it
    needed. A calibration that runs long is killed at its section's end."""
    result, gpu = fake_run(monkeypatch, calibrate_s=500.0, graph_s=3.0)
    t = result["time"]
    assert t["total_s"] <= gpu_check.TOTAL_S
    assert t["sections"]["calibrate"]["s"] == pytest.approx(t["sections"]["calibrate"]["allowed_s"])
    assert result["calibrate"]["error"].startswith("stopped at the section's end after")
    names = [r["name"] for r in result["compiled"]["rows"]]
    assert names == ["E2E compiled float32"]
    first = result["compiled"]["skipped_for_time"][0]
    assert first.startswith("R1E compiled float32 (needs ~") and ("R1E", "plain", "float32", True) not in gpu.built
    expected = float(first.split("needs ~")[1].split(" s")[0])
    assert expected >= 47 * 3.0                            # estimated from its graph count


def test_graphs_as_planned_match_the_compiled_parts():
    assert [gpu_check.graph_count(m) for m in ("E2E", "R0", "R1E")] == [2, 32, 47]


def test_a_running_row_stops_its_steps_at_the_end():
    clock = FakeClock()
    budget = gpu_check.Budget(clock() + 3.0, clock)
    def step():
        clock.advance(0.4)
        return 0.4
    out = gpu_check.timed_steps(step, budget, lambda s: s())
    assert clock() <= budget.end                           # no step started that would end past it
    assert 0 < out["timed_steps"] < gpu_check.TIMED and out["step_s"] == 0.4
    late = gpu_check.Budget(clock() + 0.5, clock)           # room for the first step only
    out = gpu_check.timed_steps(step, late, lambda s: s())
    assert out["timed_steps"] == 0 and "stopped" in out and "step_s" not in out
    assert gpu_check.row_line({"mode": "R16", "impl": "lean", "dtype": "float32", **out}).startswith(
        "| R16 | lean | float32 | stopped:")


def test_a_compiled_row_past_the_end_is_killed_and_recorded(monkeypatch):
    monkeypatch.setattr(gpu_check, "run_bounded", lambda cmd, timeout, cwd=None: {
        "rc": None, "timed_out_after_s": round(timeout), "s": timeout})
    row = gpu_check.measure_compiled(("R1E", "float32"), gpu_check.Budget(time.monotonic() + 30))
    assert row["error"].startswith("stopped at the section's end after 30 s") and row["graphs_expected"] == 47


def test_the_batch_is_the_one_the_docs_quote():
    """One batch for every section, the one benchmarks/README.md's op counts are printed at."""
    readme = (BENCH / "README.md").read_text()
    assert f"aten ops per training step, resnet32 K=16 batch {gpu_check.BATCH} on cpu" in readme
    assert f"ResNet-32 at batch {gpu_check.BATCH} (`BATCH`" in readme
    assert gpu_check.step_config("R1E", "plain").batch_size == gpu_check.BATCH
