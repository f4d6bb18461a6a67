"""The learning-rate schedule against the authors' formula; end-to-end training on the
embedded digits: it learns, and resume is bit-exact."""
import json
import math

import pytest
import torch

import contsup.rundir as rundir
import contsup.train as train_module
from contsup.train import TrainConfig, learning_rate, train

TIMING_KEYS = {"epoch_seconds", "images_per_s"}


def authors_lr(epoch_1based, lr, epochs):
    """The authors' adjust_learning_rate (cos_lr, 10 warm-up epochs from 0.01), called with
    the 1-based epoch number."""
    e = epoch_1based
    cos = 0.5 * lr * (1 + math.cos(math.pi * e / epochs))
    if e <= 10:
        return cos * (e - 1) / 10 + 0.01 * (11 - e) / 10
    return cos


@pytest.mark.parametrize("lr, epochs", [(0.8, 160), (0.1, 160), (0.05, 30)])
def test_learning_rate_is_the_authors_schedule(lr, epochs):
    """Their loop calls adjust_learning_rate(epoch + 1) for 0-based epoch: ours takes the
    0-based epoch and must agree on the first 12 (warm-up and its end) and the last 2."""
    for epoch in [*range(12), epochs - 2, epochs - 1]:
        assert learning_rate(epoch, lr, epochs, 10) == pytest.approx(authors_lr(epoch + 1, lr, epochs), abs=1e-12)
    assert learning_rate(0, lr, epochs, 10) == pytest.approx(0.01)   # the warm-up starts at 0.01
    assert learning_rate(epochs - 1, lr, epochs, 10) == pytest.approx(0.0, abs=1e-12)  # the last epoch at 0
    assert all(learning_rate(e, lr, epochs, 10) > learning_rate(e + 1, lr, epochs, 10) for e in range(10, epochs - 1))


def test_learning_rate_without_warm_up_and_for_one_epoch():
    # no warm-up: 0-based epoch i trains at cos(i + 1), one step below the top
    assert learning_rate(0, 0.1, 4, 0) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(3, 0.1, 4, 0) == pytest.approx(0.0, abs=1e-12)
    # a one-epoch run without warm-up would train at lr 0: it uses the base lr instead
    assert learning_rate(0, 0.1, 1, 0) == 0.1
    assert learning_rate(0, 0.1, 1, 10) == pytest.approx(0.01)  # with warm-up the authors' formula holds


def test_resnet32_k4_r1e_learns_digits(tmp_path):
    """Chance is 90% test error; a few epochs bring it far below."""
    cfg = TrainConfig(dataset="digits8", arch="resnet32", k=4, mode="R1E", epochs=5, warmup_epochs=0,
                      batch_size=64, lr=0.05, out_dir=str(tmp_path / "run"), device="cpu")
    result = train(cfg, progress=False)
    assert result["final_error"] < 25.0, result["final_error"]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(5))
    assert rows[-1]["train_error"] < rows[0]["train_error"]
    assert result["params"]["backbone"] == 466_906 and result["peak_activation_bytes"] > 0
    assert len(result["cuts"]) == 3
    assert [r["lr"] for r in rows] == [learning_rate(e, 0.05, 5, 0) for e in range(5)]  # the last at lr 0
    # training memory as the paper counts it: parameters + gradients + momentum + the plain
    # encoders' activations (more than the lean encoders' that ran)
    parts = result["paper_memory_parts"]
    assert result["paper_memory_bytes"] == sum(parts.values())
    assert parts["parameters"] == parts["optimizer_state"] == 4 * sum(result["params"].values())
    assert parts["plain_peak_activation_bytes"] > result["peak_activation_bytes"]


def _cfg(out):
    return TrainConfig(dataset="digits8", arch="resnet32", k=4, mode="R1E", epochs=3, warmup_epochs=1,
                       batch_size=64, lr=0.05, train_subset=256, out_dir=str(out), device="cpu", seed=3)


def _metrics(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, interrupt_in_second_evaluation):
    straight = train(_cfg(tmp_path / "straight"), progress=False)

    # Kill the second run during epoch 1's evaluation: epoch 1 trained, not yet checkpointed.
    restore = interrupt_in_second_evaluation()
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "resumed"), progress=False)
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["epoch"] == 0
    restore()
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
    # check_every=1: the check is read before every optimizer step, so the bad step is never applied
    cfg = TrainConfig(dataset="digits8", arch="resnet32", k=4, mode="R1E", epochs=3, warmup_epochs=0,
                      batch_size=64, train_subset=256, out_dir=str(out), device="cpu", check_every=1)
    ckpt_bytes = {}
    real_save = rundir.atomic_save

    def save_and_remember(obj, path, as_json=False):
        real_save(obj, path, as_json)
        if path.name == "ckpt.pt":
            ckpt_bytes[obj["epoch"]] = path.read_bytes()

    monkeypatch.setattr(rundir, "atomic_save", save_and_remember)
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



def test_divergence_read_every_n_steps_names_the_same_first_bad_step(tmp_path, monkeypatch):
    """With the check read every 50 steps (the default: in an epoch of 4 steps, at its end
    only, after the optimizer took the bad step and the NaN steps after it), a run that
    diverges in epoch 1 names the same first bad step, module and losses as one checked
    before every step, and keeps epoch 0's checkpoint byte for byte."""
    from contsup.errors import DivergedError
    monkeypatch.setattr(train_module, "learning_rate", lambda epoch, *args: 0.05 if epoch == 0 else 1e6)
    ckpt_bytes = {}
    real_save = rundir.atomic_save

    def save_and_remember(obj, path, as_json=False):
        real_save(obj, path, as_json)
        if path.name == "ckpt.pt":
            ckpt_bytes[path.parent.name] = path.read_bytes()

    monkeypatch.setattr(rundir, "atomic_save", save_and_remember)
    errors = {}
    for every in (1, 50):
        out = tmp_path / f"every{every}"
        cfg = TrainConfig(dataset="digits8", arch="resnet32", k=4, mode="R1E", epochs=3, warmup_epochs=0,
                          batch_size=64, train_subset=256, out_dir=str(out), device="cpu", check_every=every)
        with pytest.raises(DivergedError) as failure:
            train(cfg, progress=False)
        errors[every] = failure.value
        assert (out / "ckpt.pt").read_bytes() == ckpt_bytes[out.name]      # epoch 0's, untouched
        assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 0
        assert [r["epoch"] for r in _metrics(out)] == [0]
        assert sorted(_strict_json_files(out)) == ["config.json", "error.json", "metrics.jsonl"]
    exact, late = errors[1], errors[50]
    assert (late.epoch, late.step, late.module, late.losses) == (exact.epoch, exact.step, exact.module, exact.losses)
    assert "stopped at the next check (--check-every)" in str(late) and "before applying it" in str(exact)
    record = json.loads((tmp_path / "every50" / "error.json").read_text())
    assert (record["epoch"], record["step"], record["module"], record["losses"]) == \
        (late.epoch, late.step, late.module, late.losses)
    a = torch.load(tmp_path / "every1" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "every50" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(t, b[name]) for name, t in a.items())

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
