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
