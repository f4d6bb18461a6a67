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
import gpu_check_wrap  # noqa: E402


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
            "nccl": {"skipped": "1 GPU: needs two"}, "wrap": fake_wrap_result(),
            "ops": {"error": "RuntimeError: no kernel"}, "compiled": {"rows": [compiled], "skipped_for_time": ["E compiled"]},
            "nan_check": math.nan,
            "time": {"total_s": 250.4, "deadline_s": 290, "sections": {"steps": {"s": 89.6, "allowed_s": 90.0}}}}


def fake_wrap_result():
    check = {"model": "cifar_resnet18", "check": "R0 eval", "equal": False, "max_abs_diff": 3e-6, "max_abs_logit": 2.5,
             "name": "cifar_resnet18 R0 eval"}
    step = {"model": "cifar_resnet18", "k": 1, "mode": "E2E", "context_impl": "plain", "step_s": 0.05,
            "images_per_s": 5120.0, "max_memory_allocated": 400 * 2**20, "name": "cifar_resnet18 E2E"}
    r1e = {**step, "k": 4, "mode": "R1E", "step_s": 0.07, "images_per_s": 3657.0, "max_memory_allocated": 240 * 2**20,
           "name": "cifar_resnet18 R1E K=4"}
    rows = [check, step, r1e, {"name": "small_vit R0 eval", "error": "RuntimeError: boom"}]
    cpu = gpu_check_wrap.CPU_RESULTS.with_name("no_such.json")
    return {"rows": rows, "skipped_for_time": ["small_vit E2E (needs ~13 s, 2 s left)"], "batch": 256, "k": 4,
            "context_impl": "plain", "ratios": gpu_check_wrap.wrap_ratios(rows, cpu)}


def test_results_json_and_markdown(tmp_path, capsys):
    json_path, md_path = gpu_check.write_results(fake_result(), tmp_path)
    assert json_path.name == "gpu_nvidia-fake-gpu-80gb.json" and md_path.name == "gpu_nvidia-fake-gpu-80gb.md"
    stored = json.loads(json_path.read_text())          # strict JSON: NaN written as null (jsonio)
    assert stored["nan_check"] is None and stored["steps"]["rows"][0]["images_per_s"] == 12800.0
    md = md_path.read_text().splitlines()
    assert "| R1E | lean | float32 | 12800 | 300 | 200 | 150 | 0.75 | 0.50 | - |" in md
    assert "| R1E | compiled | float32 | 12800 | 300 | - | - | - | 0.50 | 0 |" in md
    assert any(line.startswith("| R16 | plain | bfloat16 | failed: OutOfMemoryError") for line in md)
    assert "Not measured (time budget): small_vit E2E (needs ~13 s, 2 s left), E compiled." in md
    assert ("- wrap cifar_resnet18, batch 256, float32: R0 eval not equal to the model's (max abs diff 3e-06, logits "
            "up to 2.5); E2E 5120 images/s, 400 MB; R1E K=4 (plain encoders) 3657 images/s, 240 MB; "
            "R1E/E2E step time 1.40x, max_memory_allocated 0.60x") in md
    assert "- wrap small_vit, batch 256, float32: R0 eval failed: RuntimeError: boom; R1E/E2E: not both measured" in md
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
# the wrap section: a wrapped model's R0 check (trace, cut, two forwards), its steps and peaks
WRAP_CHECK_S = 1.0
WRAP_STEP_S = {("cifar_resnet18", "E2E"): 0.05, ("cifar_resnet18", "R1E"): 0.07, ("small_vit", "E2E"): 0.02,
               ("small_vit", "R1E"): 0.03}
WRAP_PEAK = {"E2E": 400 * 2**20, "R1E": 240 * 2**20}


class FakeGpu:
    """Stands in for gpu_check's CUDA calls and subprocesses; records what ran."""

    def __init__(self, monkeypatch, clock, calibrate_s=SECTION_S["calibrate"], graph_s=GRAPH_S):
        self.clock, self.built, self.synced, self.calibrate_s, self.graph_s = clock, [], [], calibrate_s, graph_s
        self.peak, self.wrapped = 300 * 2**20, []
        for name in ("build_step", "step_seconds", "count_syncs", "count_ops", "run_bounded"):
            monkeypatch.setattr(gpu_check, name, getattr(self, name))
        for name in ("build_wrap_step", "r0_equality"):
            monkeypatch.setattr(gpu_check_wrap, name, getattr(self, name))
        for name, fn in {"reset_peak": lambda device: None, "peak_bytes": lambda device: self.peak,
                         "free_cached": lambda device: None, "gpu_count": lambda: 1}.items():
            monkeypatch.setattr(gpu_check, name, fn)

    def build_step(self, mode, impl, dtype, compiled, device):
        from torch._dynamo.utils import counters
        self.built.append((mode, impl, dtype, compiled))
        self.peak = 300 * 2**20
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

    def build_wrap_step(self, model, mode, device, batch):
        self.wrapped.append((model, mode))
        self.peak = WRAP_PEAK[mode]
        step, calls = WRAP_STEP_S[model, mode], []

        def one_step():
            self.clock.advance(step + (not calls) * FIRST_S)
            calls.append(step)
            return step
        self.clock.advance(SETUP_S)
        return one_step, {"model": model, "mode": mode, "k": 1 if mode == "E2E" else gpu_check_wrap.WRAP_K,
                          "batch": batch, "context_impl": "plain"}

    def r0_equality(self, model, device, batch):
        self.wrapped.append((model, "R0 eval"))
        self.clock.advance(WRAP_CHECK_S)
        return {"model": model, "check": "R0 eval", "equal": True, "max_abs_diff": 0.0, "max_abs_logit": 1.0}

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
    assert list(t["sections"]) == ["steps", "wrap", "syncs", "ops", "calibrate", "nccl", "compiled"]
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

    # wrap: both models' R0 check and E2E and R1E K=4 steps, timed after the warm-up; R1E against E2E
    wrap = result["wrap"]
    assert [r["name"] for r in wrap["rows"]] == [gpu_check_wrap.wrap_label(i) for i in gpu_check_wrap.WRAP_ITEMS]
    assert not wrap["skipped_for_time"] and wrap["context_impl"] == "plain"
    assert all(r["timed_steps"] == gpu_check.TIMED for r in wrap["rows"] if "mode" in r)
    assert wrap["ratios"]["cifar_resnet18"]["time"] == pytest.approx(0.07 / 0.05)
    assert wrap["ratios"]["small_vit"]["memory"] == pytest.approx(0.6)
    assert "- wrap cifar_resnet18, batch 256, float32: R0 eval torch.equal to the model's" in gpu_check.markdown(result)
    assert t["sections"]["wrap"]["s"] < gpu_check.BUDGET_S["wrap"]

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


def test_wrap_rows_that_do_not_fit_are_skipped_with_their_estimate(monkeypatch):
    """With 8 s for the wrap section, each model's R0 check fits (5 s as planned before any,
    then the first one's time) but no training row does (a row as planned: set-up, warm-up
    and the fewest timed steps): those are listed with their estimate and never built; the
    other sections still run, within the deadline."""
    monkeypatch.setitem(gpu_check.BUDGET_S, "wrap", 8)
    result, gpu = fake_run(monkeypatch)
    wrap = result["wrap"]
    assert gpu.wrapped == [("cifar_resnet18", "R0 eval"), ("small_vit", "R0 eval")]
    assert [r["name"] for r in wrap["rows"]] == ["cifar_resnet18 R0 eval", "small_vit R0 eval"]
    skipped = wrap["skipped_for_time"]
    assert [s.split(" (")[0] for s in skipped] == ["cifar_resnet18 E2E", "cifar_resnet18 R1E K=4", "small_vit E2E",
                                                   "small_vit R1E K=4"]
    planned = gpu_check.planned_s(gpu_check.PRIOR_S["setup"], gpu_check.PRIOR_S["step"])
    assert all(f"needs ~{planned:.0f} s" in s for s in skipped)
    assert all(v["time"] is None and v["memory"] is None for v in wrap["ratios"].values())
    t = result["time"]
    assert t["sections"]["wrap"]["s"] <= t["sections"]["wrap"]["allowed_s"] and t["total_s"] <= gpu_check.TOTAL_S
    assert "syncs" in result["syncs"] and result["compiled"]["rows"]
    md = gpu_check.markdown(result)
    assert "cifar_resnet18 E2E (needs ~" in md and "R1E/E2E: not both measured" in md


def test_wrap_needs_more_than_a_tiny_budget(monkeypatch):
    clock = FakeClock()
    gpu = FakeGpu(monkeypatch, clock)
    out = gpu_check.section_wrap("cuda", gpu_check.Budget(clock() + 3.0, clock))
    assert out["rows"] == [] and gpu.wrapped == [] and clock() == 1000.0
    assert len(out["skipped_for_time"]) == len(gpu_check_wrap.WRAP_ITEMS)
    assert out["skipped_for_time"][0] == "cifar_resnet18 R0 eval (needs ~5 s, 3 s left)"
    assert gpu_check_wrap.wrap_line(out) is None


# --------------------------------------------------------------------------------------
# The wrap section's own code on a CPU (device "cpu"): only the CUDA calls (events,
# max_memory_allocated) are stubbed, by wall-clock and fixed stand-ins.
def test_a_wrapped_resnets_r0_check_runs_on_a_cpu():
    """The CIFAR-stem ResNet-18 cut at K=4 in eval mode gives the model's logits bit for bit
    on a CPU (contsup.wrap's contract), and the logits are not zero by construction."""
    r = gpu_check_wrap.r0_equality("cifar_resnet18", "cpu", 2)
    assert r["equal"] and r["max_abs_diff"] == 0.0 and r["max_abs_logit"] > 0
    assert r["k"] == 4 and len(r["cuts"]) == 3


def test_the_wrap_section_runs_on_a_cpu(monkeypatch):
    """section_wrap end to end with the small ViT on a CPU: the real wrapped nets, the
    trainer's step (build_net, prepare_model, local_learning_step + SGD), the R0 check
    (its zero-initialised head given random weights first, so equality means something),
    the ratios and the markdown line."""
    monkeypatch.setattr(gpu_check_wrap, "WRAP_ITEMS", [i for i in gpu_check_wrap.WRAP_ITEMS if i[0] == "small_vit"])
    for name, value in {"BATCH": 2, "WARMUP": 1, "TIMED": 2}.items():
        monkeypatch.setattr(gpu_check, name, value)
    peaks = iter([100, 60])

    def wall_seconds(one_step, device):
        t0 = time.perf_counter()
        one_step()
        return time.perf_counter() - t0
    for name, fn in {"step_seconds": wall_seconds, "reset_peak": lambda device: None,
                     "peak_bytes": lambda device: next(peaks), "free_cached": lambda device: None}.items():
        monkeypatch.setattr(gpu_check, name, fn)
    out = gpu_check.section_wrap("cpu", gpu_check.Budget(time.monotonic() + 600))
    check, e2e, r1e = out["rows"]
    assert check["equal"] and check["max_abs_diff"] == 0.0 and check["max_abs_logit"] > 0
    assert check["zero_params_randomised"] > 0
    assert (e2e["k"], r1e["k"]) == (1, 4) and out["context_impl"] == "lean" == r1e["context_impl"]   # a CPU's default
    assert r1e["encoder_impls"] == {"plain": 5}                  # token encoders have no lean form
    assert e2e["timed_steps"] == r1e["timed_steps"] == 2 and e2e["images_per_s"] > 0
    ratio = out["ratios"]["small_vit"]
    assert ratio["time"] == pytest.approx(r1e["step_s"] / e2e["step_s"]) and ratio["memory"] == 0.6
    assert gpu_check_wrap.wrap_line(out).startswith("- wrap small_vit, batch 2, float32: R0 eval torch.equal")


def test_a_wrapped_training_step_reads_nothing_from_the_host():
    """The step the wrap section times (local_learning_step and the SGD step) asks the host
    for no value (aten._local_scalar_dense: .item(), bool(), int() of a tensor): on CUDA it
    would wait for the device inside the timed step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.reads += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))
    one_step, facts = gpu_check_wrap.build_wrap_step("cifar_resnet18", "R1E", "cpu", 2)
    one_step()                                   # the first step creates the optimizer's state
    with Reads() as reads:
        one_step()
    assert reads.reads == 0 and facts["encoder_impls"] == {"lean": 5} and facts["k"] == 4
