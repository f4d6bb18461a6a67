"""End-to-end training on the embedded digits: it learns, and resume is bit-exact."""
import json

import pytest
import torch

import contsup.train as train_module
from contsup.train import TrainConfig, train

TIMING_KEYS = {"epoch_seconds", "images_per_s"}


def test_resnet32_k4_r1e_learns_digits(tmp_path):
    """Measured: 2.8% test error after 6 epochs, 5.6% after 5 (chance is 90%)."""
    cfg = TrainConfig(dataset="digits8", arch="resnet32", k=4, mode="R1E", epochs=5, warmup_epochs=0,
                      batch_size=64, lr=0.05, out_dir=str(tmp_path / "run"), device="cpu")
    result = train(cfg, progress=False)
    assert result["final_error"] < 25.0, result["final_error"]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(5))
    assert rows[-1]["train_error"] < rows[0]["train_error"]
    assert result["params"]["backbone"] == 466_906 and result["peak_activation_bytes"] > 0
    assert len(result["cuts"]) == 3


def _cfg(out):
    return TrainConfig(dataset="digits8", arch="resnet32", k=4, mode="R1E", epochs=3, warmup_epochs=1,
                       batch_size=64, lr=0.05, train_subset=256, out_dir=str(out), device="cpu", seed=3)


def _metrics(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    straight = train(_cfg(tmp_path / "straight"), progress=False)

    # Kill the second run during epoch 1's evaluation: epoch 1 trained, not yet checkpointed.
    real_evaluate, calls = train_module.evaluate, []

    def dying_evaluate(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    monkeypatch.setattr(train_module, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "resumed"), progress=False)
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    resumed = train(_cfg(tmp_path / "resumed"), resume=True, progress=False)

    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert resumed["final_error"] == straight["final_error"]
    # A finished run is not trained again.
    assert train(_cfg(tmp_path / "resumed"), resume=True, progress=False) == resumed


def test_resume_accepts_speed_options_refuses_bf16_and_old_configs(tmp_path):
    from contsup.errors import UsageError
    cfg = TrainConfig(dataset="digits8", arch="resnet32", k=2, mode="R1E", epochs=1, warmup_epochs=0,
                      batch_size=64, train_subset=64, out_dir=str(tmp_path / "run"), device="cpu")
    train(cfg, progress=False)
    (tmp_path / "run" / "result.json").unlink()  # as if killed right after the last checkpoint
    with pytest.raises(UsageError, match="bf16"):
        train(TrainConfig(**{**cfg.__dict__, "bf16": True}), resume=True, progress=False)
    # A checkpoint written before the speed options existed resumes under their defaults.
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    for key in ("channels_last", "bf16", "cudnn_benchmark", "torch_compile"):
        ckpt["config"].pop(key)
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    faster = TrainConfig(**{**cfg.__dict__, "channels_last": False, "cudnn_benchmark": False})
    assert train(faster, resume=True, progress=False)["epochs"] == 1


# --------------------------------------------------------------------------------------
# A run that goes wrong stops at once and says where; every file written is strict JSON.
def _strict_json_files(folder):
    """Parse every *.json and *.jsonl under `folder` refusing NaN/Infinity; the file names."""
    from contsup.jsonio import loads_strict
    names = []
    for path in sorted(folder.rglob("*.json*")):
        text = path.read_text()
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        for line in filter(str.strip, lines):
            loads_strict(line)
        names.append(path.name)
    return names


def test_diverging_run_stops_at_first_bad_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from contsup.errors import DivergedError
    # Epoch 0 at a sane lr, then a step size that blows the weights up in epoch 1.
    monkeypatch.setattr(train_module, "learning_rate", lambda epoch, *args: 0.05 if epoch == 0 else 1e6)
    real_step, steps = train_module.local_learning_step, []

    def recorded_step(*args, **kwargs):
        logits, losses = real_step(*args, **kwargs)
        steps.append(bool(torch.isfinite(losses).all()))
        return logits, losses

    optimizer_steps = []
    real_optimizer_step = torch.optim.SGD.step
    monkeypatch.setattr(train_module, "local_learning_step", recorded_step)
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **kw: optimizer_steps.append(1)
                        or real_optimizer_step(self, *a, **kw))
    out = tmp_path / "run"
    cfg = TrainConfig(dataset="digits8", arch="resnet32", k=4, mode="R1E", epochs=3, warmup_epochs=0,
                      batch_size=64, train_subset=256, out_dir=str(out), device="cpu")
    ckpt_bytes = {}
    real_save = train_module._atomic_save

    def save_and_remember(obj, path, as_json=False):
        real_save(obj, path, as_json)
        if path.name == "ckpt.pt":
            ckpt_bytes[obj["epoch"]] = path.read_bytes()

    monkeypatch.setattr(train_module, "_atomic_save", save_and_remember)
    with pytest.raises(DivergedError) as failure:
        train(cfg, progress=False)
    e = failure.value
    assert e.epoch == 1 and 1 <= e.module <= 4
    # It stopped at the first non-finite step, before the optimizer applied it.
    assert steps[-1] is False and all(steps[:-1])
    assert len(optimizer_steps) == 4 + e.step   # epoch 0's 4 steps, epoch 1's good ones
    assert e.losses[e.module - 1] is None and all(v is not None for v in e.losses[:e.module - 1])
    assert f"epoch 1, step {e.step}" in str(e) and "--lr" in str(e) and "\n" not in str(e)
    error = json.loads((out / "error.json").read_text())
    assert (error["epoch"], error["step"], error["module"], error["error"]) == (1, e.step, e.module, str(e))
    assert error["losses"] == e.losses
    assert [r["epoch"] for r in _metrics(out)] == [0]           # no line of the failed epoch, no NaN
    assert list(ckpt_bytes) == [0] and (out / "ckpt.pt").read_bytes() == ckpt_bytes[0]
    assert not (out / "result.json").exists()
    assert sorted(_strict_json_files(out)) == ["config.json", "error.json", "metrics.jsonl"]

    # --resume continues from epoch 1 (the same config diverges at the same step again).
    steps.clear()
    with pytest.raises(DivergedError) as again:
        train(cfg, resume=True, progress=False)
    assert (again.value.epoch, again.value.step, len(steps)) == (1, e.step, e.step + 1)
    assert (out / "ckpt.pt").read_bytes() == ckpt_bytes[0]


def test_step_progress_bar_and_quiet_runs(tmp_path, capsys):
    cfg = lambda name, **kw: TrainConfig(dataset="digits8", arch="resnet32", k=2, mode="R1E", epochs=1,  # noqa: E731
                                         warmup_epochs=0, batch_size=32, train_subset=96,
                                         out_dir=str(tmp_path / name), device="cpu", **kw)
    train(cfg("quiet"), progress=False)
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""
    train(cfg("shown"), progress=True)
    err = capsys.readouterr().err
    # The step bar opens with the epoch's 3 steps (96 images / batch 32); later refreshes are
    # timed (tqdm's mininterval) and it is cleared on close (leave=False), so only its start is sure.
    assert "epoch 0:   0%|          | 0/3 [" in err and "step/s" in err
    # Every file a finished run writes parses as strict JSON.
    assert sorted(_strict_json_files(tmp_path / "shown")) == ["config.json", "metrics.jsonl", "result.json"]
