"""The GPU-hours estimate: the FLOP counts and their scaling, the group/total bookkeeping,
and the `estimate` command line. Counting runs real (tiny) steps, so the tests stick to
8x8 digits where the resolution does not matter and to a handful of 32x32 models."""
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from contsup.study import estimate as est
from contsup import tables
from contsup.cli import main
from contsup.data import load_dataset
from contsup.model import ModelConfig, parse_mode
from contsup.speed.encoders import resolve_context_impl
from contsup.train import TrainConfig


def digits8(**kw) -> ModelConfig:
    return ModelConfig(**{"dataset": "digits8", **kw})


# --------------------------------------------------------------------------------------
# Counting and scaling
@pytest.mark.parametrize("mc", [digits8(arch="resnet32", k=1, mode="R0"),
                                digits8(arch="resnet32", k=4, mode="R1E", reconstruct=True),
                                digits8(arch="resnet110", k=8, mode="R2", loss="softmax")],
                         ids=["e2e", "K4-R1E-recon", "r110-K8-R2"])
def test_flops_are_linear_in_the_batch_without_contrast_heads(mc):
    assert not est.has_quadratic_term(mc)
    cost = est.step_cost(TrainConfig(**vars(mc), context_impl="lean"))  # fitted at B=1 and B=2; B=8 is a prediction
    assert est.count_step_flops(mc, 8) == cost.step(8)
    assert est.count_eval_flops(mc, 4) == 2 * est.count_eval_flops(mc, 2)
    # the constant part: the BN statistics of lean's 1x1 (residual) encoders, nothing else
    assert (cost.per_step > 0) == (parse_mode(mc.mode, mc.k).n > 0)
    fused = est.step_cost(TrainConfig(**{**vars(mc), "context_impl": "fused"}))
    assert fused.per_step == 0


def test_contrast_heads_add_exactly_the_supcon_quadratic_term():
    mc = digits8(arch="resnet32", k=4, mode="R1E", loss="contrast")
    assert est.has_quadratic_term(mc)
    cost = est.step_cost(TrainConfig(**vars(mc), context_impl="lean"))
    # Fitted at B=1, 2 and 3; B=16 is a prediction. Per head: z@z.T forward 2*B^2*D, backward
    # twice that, D = 128 -> 768 B^2; K-1 = 3 heads.
    assert est.count_step_flops(mc, 16) == cost.step(16)
    assert cost.per_pair == 3 * 768
    # Linear again once the heads are softmax.
    soft = est.step_cost(TrainConfig(**{**vars(mc), "loss": "softmax"}))
    assert soft.per_pair == 0


@pytest.mark.parametrize("mc,impl,batch", [
    (ModelConfig(dataset="cifar10", arch="resnet32", k=1, mode="R0"), "lean", 2),
    (digits8(arch="resnet32", k=4, mode="R1E", loss="contrast", reconstruct=True), "lean", 3),
    (digits8(arch="resnet32", k=16, mode="R16"), "fused", 2),
    (digits8(arch="resnet110", k=4, mode="E", balanced=True), "plain", 2),
], ids=["cifar-e2e", "K4-R1E-contrast-recon", "K16-R16-fused", "r110-K4-E-balanced-plain"])
def test_fast_counter_equals_torch_flop_counter(mc, impl, batch):
    # _FlopTotal is FlopCounterMode without its per-module bookkeeping: the same total, op for op.
    fast = est.count_step_flops(mc, batch, impl)
    assert fast == est.count_step_flops(mc, batch, impl, counter_mode=FlopCounterMode) > 0
    assert est.count_eval_flops(mc, batch) == est.count_eval_flops(mc, batch, FlopCounterMode) > 0


@pytest.mark.parametrize("cfg", [
    TrainConfig(dataset="digits8", arch="resnet32", k=8, mode="R1E", loss="contrast", batch_size=50, epochs=2),
    TrainConfig(dataset="digits8", arch="resnet110", k=2, mode="E", reconstruct=True, batch_size=100, epochs=1),
], ids=["contrast-K8", "r110-recon"])
def test_run_flops_equals_the_slow_direct_count_of_every_step(cfg):
    # The whole run counted the slow way: every step at its own batch size (the last one
    # short) with torch's FlopCounterMode, and the test-set pass image by image.
    n_train, n_test = est.dataset_sizes(cfg)
    full, last = divmod(n_train, cfg.batch_size)
    mc = cfg.model_config()
    impl = resolve_context_impl(cfg.context_impl, "cuda", cfg.torch_compile)   # what the estimate charges: the GPU's
    slow_step = lambda b: est.count_step_flops(mc, b, impl, FlopCounterMode)  # noqa: E731
    slow = full * slow_step(cfg.batch_size) + (slow_step(last) if last else 0) \
        + n_test * est.count_eval_flops(mc, 1, FlopCounterMode)
    assert est.run_flops(cfg) == cfg.epochs * slow


def test_backbone_forward_matches_the_published_resnet_counts():
    # He et al.'s CIFAR ResNets: ResNet-32 ~69.1M and ResNet-110 ~253M multiply-adds per
    # 32x32 image (2 FLOPs each). K=1 inference is the bare backbone.
    r32 = est.eval_flops(TrainConfig(dataset="cifar10", arch="resnet32", k=1, mode="R0"))
    r110 = est.eval_flops(TrainConfig(dataset="cifar10", arch="resnet110", k=1, mode="R0"))
    assert r32 == pytest.approx(2 * 69.1e6, rel=0.01)
    assert r110 == pytest.approx(2 * 253e6, rel=0.01)


def test_e2e_step_is_about_three_forward_passes():
    cfg = TrainConfig(dataset="cifar10", arch="resnet32", k=1, mode="R0", batch_size=2)
    ratio = est.step_flops(cfg) / (2 * est.eval_flops(cfg))
    # backward = 2x forward, less the stem conv's input gradient (the image needs none)
    assert 2.97 < ratio < 3.0


def test_context_supply_and_heads_cost_what_they_should():
    def cost(k=4, mode="R0", **kw):
        return est.step_cost(TrainConfig(dataset="digits8", arch="resnet32", k=k, mode=mode, **kw))

    step = {m: cost(mode=m).step(128) for m in ("R0", "E", "R1", "R1E")}
    assert step["R0"] < step["E"] < step["R1E"] and step["R0"] < step["R1"] < step["R1E"]
    assert cost(k=1).step(128) < step["R0"]                       # 3 local heads
    assert cost(reconstruct=True).step(128) > step["R0"]          # 3 decoders
    # Inference: heads and decoders are off the path, context encoders are on it.
    assert cost(mode="R0").eval_per_image == cost(k=1).eval_per_image
    assert cost(reconstruct=True).eval_per_image == cost().eval_per_image
    assert cost(mode="R1E").eval_per_image > cost(mode="R0").eval_per_image


def test_dataset_sizes_of_the_embedded_digits_match_the_loader():
    data = load_dataset("digits8")  # digits is the same split, upsampled
    sizes = (len(data.train_x), len(data.test_x))
    assert tables.DATASET_SIZES["digits"] == tables.DATASET_SIZES["digits8"] == sizes
    assert set(tables.DATASET_SIZES) == set(tables.DATA_RECIPES)


def test_run_flops_counts_every_image_of_every_epoch_once():
    cfg = TrainConfig(dataset="cifar10", arch="resnet32", k=1, mode="R0", epochs=3)
    c = est.step_cost(cfg)
    # 48 full batches of 1024 and a last one of 848: linear, so exactly 50000 images.
    assert est.run_flops(cfg) == 3 * (50_000 * c.step(1) + 10_000 * c.eval_per_image)
    sub = TrainConfig(dataset="cifar10", arch="resnet32", k=1, mode="R0", epochs=3, train_subset=100)
    assert est.run_flops(sub) == 3 * (100 * c.step(1) + 10_000 * c.eval_per_image)


# --------------------------------------------------------------------------------------
# estimate(): groups, total, assumptions
def test_one_group_total_equals_its_row_and_hours_follow_the_assumptions():
    r = est.estimate("paper", only=["table1"])
    (row,) = r["groups"]
    assert row["group"] == "table1" and row["runs"] == r["total"]["runs"] == 4
    assert row["flops"] == r["total"]["flops"] == sum(run["flops"] for run in r["runs"])
    assert r["assumptions"]["precision"] == "tf32" and r["assumptions"]["peak_tflops"] == 494.7
    assert r["total"]["gpu_hours"] == pytest.approx(r["total"]["flops"] / (494.7e12 * est.UTILISATION) / 3600)
    assert r["assumptions"]["utilisation_basis"] == est.UTILISATION_BASIS
    # Counts are cached: other assumptions are instant and scale the hours only.
    double = est.estimate("paper", only=["table1"], utilisation=2 * est.UTILISATION)
    bf16 = est.estimate("paper", only=["table1"], precision="bf16")
    assert double["total"]["flops"] == bf16["total"]["flops"] == r["total"]["flops"]
    assert double["total"]["gpu_hours"] == pytest.approx(r["total"]["gpu_hours"] / 2)
    assert bf16["total"]["gpu_hours"] == pytest.approx(r["total"]["gpu_hours"] / 2)


def test_shared_runs_are_in_every_group_row_and_once_in_the_total():
    r = est.estimate("smoke", only=["e2e", "motivation"])
    rows = {g["group"]: g for g in r["groups"]}
    # smoke trains all four E2E baselines on digits8: two distinct runs (ResNet-32, -110)
    assert rows["e2e"]["runs"] == 2 and rows["motivation"]["runs"] == 4
    assert r["total"]["runs"] == 5 < rows["e2e"]["runs"] + rows["motivation"]["runs"]
    assert r["total"]["flops"] < sum(g["flops"] for g in rows.values())
    assert r["total"]["flops"] == sum(run["flops"] for run in r["runs"])
    shared = [run for run in r["runs"] if len(run["groups"]) == 2]
    assert [run["name"] for run in shared] == ["digits8-resnet32-K1-E2E-seed0"]
    assert r["total"]["flops"] == sum(g["flops"] for g in rows.values()) - shared[0]["flops"]


@pytest.mark.parametrize("kw", [{"utilisation": 0}, {"utilisation": 1.5}, {"peak_tflops": -1},
                                {"precision": "fp8"}, {"only": ["table9"]}, {"profile": "huge"}])
def test_bad_assumptions_are_usage_errors(kw):
    from contsup.errors import UsageError
    with pytest.raises(UsageError):
        est.estimate(**{"profile": "smoke", **kw})


# --------------------------------------------------------------------------------------
# The command line
@pytest.mark.parametrize("argv,hint", [
    (["--utilisation", "0"], "--utilisation must be a fraction in (0, 1]"),
    (["--utilisation", "1.5"], "--utilisation must be a fraction in (0, 1]"),
    (["--utilisation", "lots"], "invalid float"),
    (["--only", "table9"], "choose from: e2e, table1"),
    (["--precision", "fp8"], "tf32, bf16"),
])
def test_cli_bad_input_one_line_exit_2(argv, hint, capsys):
    code = main(["estimate", "--profile", "smoke", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("contsup: error: ") and err.count("\n") == 1, err
    assert hint in err


def test_cli_json_and_table(capsys):
    argv = ["estimate", "--profile", "smoke", "--only", "e2e", "motivation", "--no-progress"]
    assert main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [g["group"] for g in r["groups"]] == ["e2e", "motivation"] and r["total"]["runs"] == 5
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "total" in out and "assumptions: one NVIDIA H100 SXM, TF32" in out
    assert main(argv + ["--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| group | runs | PFLOPs | GPU-hours |")


# --------------------------------------------------------------------------------------
# The assumed utilisation is named as one; --calibrate measures the rate instead
def test_table_says_the_utilisation_is_an_assumption_in_one_line(capsys):
    assert main(["estimate", "--profile", "smoke", "--only", "e2e", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    basis = [line for line in lines if line.startswith(f"utilisation {est.UTILISATION:g} is an assumption")]
    assert len(basis) == 1 and "--calibrate" in basis[0]
    assert main(["estimate", "--profile", "smoke", "--only", "e2e", "--no-progress", "--utilisation", "0.3"]) == 0
    assert "utilisation 0.3 is the caller's (--utilisation), not the default" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")
def test_calibrate_without_a_gpu_is_one_line_exit_2():
    p = subprocess.run([sys.executable, "-m", "contsup", "estimate", "--profile", "smoke", "--calibrate"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("contsup: error: estimate --calibrate") and p.stderr.count("\n") == 1, p.stderr
    assert "no" in p.stderr and "GPU" in p.stderr


def test_calibrated_hours_divide_by_the_measured_rate(monkeypatch, capsys):
    rates = {"resnet32": 20e12, "resnet110": 10e12}

    def fake_calibration(archs):
        return {"device": "Fake GPU", "torch": torch.__version__, "warmup_steps": 3, "timed_steps": 10,
                "archs": {a: {"config": {"arch": a, **est.CALIBRATION, "batch_size": 1024, "context_impl": "lean",
                                         "bf16": False},
                              "flops_per_s": rates[a], "images_per_s": 1.0, "step_s": 1.0} for a in archs}}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(est, "calibrate_rates", fake_calibration)
    r = est.estimate("smoke", only=["e2e"], calibrate=True)
    assert r["assumptions"]["device"] == "Fake GPU" and "utilisation" not in r["assumptions"]
    for run in r["runs"]:
        arch = "resnet110" if "resnet110" in run["name"] else "resnet32"
        assert run["gpu_hours"] == pytest.approx(run["flops"] / rates[arch] / 3600)
    text = est.format_table(r)
    assert "rate: measured on this Fake GPU: resnet110 10.0 TFLOP/s" in text and "assumption" not in text
    assert main(["estimate", "--profile", "smoke", "--only", "e2e", "--calibrate", "--markdown"]) == 0
    assert "measured on this Fake GPU" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrate_rates_on_the_gpu():
    cal = est.calibrate_rates(["resnet32"], warmup=2, steps=3)
    r = cal["archs"]["resnet32"]
    assert r["flops_per_s"] == pytest.approx(r["step_flops"] / r["step_s"]) and r["step_s"] > 0
    assert r["step_flops"] == est.step_flops(est.calibration_config("resnet32"))
