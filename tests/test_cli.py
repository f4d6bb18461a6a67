"""The command line: bad input gets one line and exit 2; nothing written is damaged."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from contsup.cli import main

ROOT = Path(__file__).resolve().parents[1]

BAD_INPUTS = [
    (["train", "--dataset", "mnist"], "cifar10"),
    (["train", "--arch", "resnet50"], "resnet110"),
    (["train", "--mode", "R3X"], "R1E"),
    (["train", "--loss", "hinge"], "contrast"),
    (["train", "--head", "3c3f"], "1c2f"),
    (["train", "-k", "2", "--mode", "R4"], "K >= 4"),
    (["train", "-k", "5"], "choose K from"),
    (["describe", "--arch", "resnet110", "-k", "8", "--balanced"], "with a table: 2, 3, 4"),
    (["train", "--dataset", "stl10", "--arch", "resnet32", "-k", "4", "--reconstruct"], "--loss-scales"),
    (["train", "--epochs", "-1"], "positive"),
    (["train", "--batch-size", "0"], "positive"),
    (["train", "-k", "abc"], "invalid int"),
    (["train", "--reconstruct", "--loss-scales", "1,2"], "four numbers"),
    (["train", "--loss-scales", "a,b,c,d"], "four numbers"),
    (["train", "--device", "tpu"], "cpu"),
    (["describe", "--batch-size", "1", "--no-memory"], ">= 2"),
    (["frobnicate"], "train"),
    (["download", "--dataset", "digits"], "scikit-learn"),
]


@pytest.mark.parametrize("argv,hint", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_one_line_exit_2(argv, hint, capsys, tmp_path):
    code = main(argv + (["--out", str(tmp_path / "run")] if argv[0] == "train" else []))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("contsup: error: ") and err.count("\n") == 1, err
    assert hint in err
    assert not (tmp_path / "run").exists()  # rejected before anything is written


def test_missing_dataset_names_path_and_fetch_command(capsys, tmp_path):
    code = main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "run"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert str(tmp_path / "nowhere") in err and "download" in err


def test_real_process_exit_code_and_no_traceback():
    p = subprocess.run([sys.executable, "-m", "contsup", "train", "--mode", "R99"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def _tiny_train(out, *extra):
    return main(["train", "--dataset", "digits", "-k", "2", "--mode", "R1", "--epochs", "1",
                 "--train-subset", "64", "--batch-size", "32", "--no-progress", "--out", str(out), *extra])


def files(run):
    """The run files and their bytes (`.lock` says who took the run folder's lock last: not a run file)."""
    return {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}


def test_existing_run_and_corrupt_checkpoint_are_left_intact(capsys, tmp_path):
    out = tmp_path / "run"
    assert _tiny_train(out) == 0
    before = files(out)
    assert json.loads((out / "result.json").read_text())["epochs"] == 1
    # Same folder without --resume: refused, nothing touched.
    assert _tiny_train(out) == 2
    assert "--resume" in capsys.readouterr().err
    assert files(out) == before
    # A corrupt checkpoint of an unfinished run: refused with one line, file kept as it was.
    (out / "result.json").unlink()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert _tiny_train(out, "--resume") == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and err.count("\n") == 1
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint"
    assert (out / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    # A different config on resume: refused.
    (out / "ckpt.pt").write_bytes(before["ckpt.pt"])
    assert main(["train", "--dataset", "digits", "-k", "2", "--mode", "R0", "--epochs", "1", "--train-subset",
                 "64", "--batch-size", "32", "--no-progress", "--out", str(out), "--resume"]) == 2
    assert "mode" in capsys.readouterr().err


def test_describe_json(capsys):
    assert main(["describe", "--arch", "resnet32", "-k", "16", "--mode", "R1E", "--batch-size", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["cut_points"]) == 15 and report["modules"] == 16
    assert report["params"]["backbone"] == 466_906 and report["params"]["context_encoders"] > 0
    assert report["peak_activation_MiB"] > 0
    # the paper's count: parameters, gradients and SGD momentum (4 bytes each per parameter)
    # plus the plain encoders' activations, which the default lean encoders undercut
    parts, n_params = report["paper_memory_parts_MiB"], sum(report["params"].values())
    assert parts["parameters"] == parts["gradients"] == parts["optimizer_state"] == pytest.approx(n_params * 4 / 2**20)
    assert parts["plain_peak_activation_bytes"] > report["peak_activation_MiB"]
    assert report["paper_memory_MiB"] == pytest.approx(sum(parts.values()))


def test_speed_flags_reach_the_run_config(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits8", "-k", "2", "--mode", "R1E", "--epochs", "1", "--train-subset", "32",
                 "--batch-size", "16", "--bf16", "--no-channels-last", "--context-impl", "fused", "--no-cudnn-benchmark",
                 "--no-reuse-cpu-memory", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bf16"], cfg["channels_last"], cfg["context_impl"], cfg["cudnn_benchmark"], cfg["torch_compile"],
            cfg["reuse_cpu_memory"]) == (True, False, "fused", False, False, False)
    assert json.loads((out / "result.json").read_text())["final_error"] <= 100


def test_diverging_run_one_line_exit_1(capsys, tmp_path):
    out = tmp_path / "nan"
    code = main(["train", "--dataset", "digits8", "-k", "4", "--epochs", "3", "--batch-size", "64", "--lr", "1e6",
                 "--warmup-epochs", "0", "--train-subset", "256", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith("contsup: error: the loss of ") and "--lr" in err
    assert "Traceback" not in err and "epoch 0, step " in err
    error = json.loads((out / "error.json").read_text())
    assert f"epoch {error['epoch']}, step {error['step']}" in err
    assert (out / "metrics.jsonl").read_text() == "" and not (out / "ckpt.pt").exists()


# --------------------------------------------------------------------------------------
# What the texts say
def test_describe_names_the_dataset_and_its_image_size(capsys):
    assert main(["describe", "--dataset", "digits8", "-k", "2", "--no-memory"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "resnet32 K=2 mode=R1E on digits8 (8x8 images, 10 classes)", header
    assert main(["describe", "-k", "2", "--no-memory", "--json"]) == 0   # train's default dataset
    report = json.loads(capsys.readouterr().out)
    assert (report["config"]["dataset"], report["image_size"], report["num_classes"]) == ("digits", 32, 10)


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv + ["--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())   # argparse's line breaks undone


def test_train_help_says_the_recipe_is_the_papers_and_the_dataset_is_not(capsys):
    """`train`'s defaults are the paper's recipe (160 epochs...) applied to the embedded
    digits, which the paper does not use: the help and the README say both."""
    from contsup import tables
    from contsup.train import TrainConfig
    text = _help(["train"], capsys)
    default = TrainConfig()
    assert default.dataset == "digits" and default.epochs == tables.PAPER_SCHEDULE.epochs == 160
    assert f"{default.epochs} epochs" in text and "METHOD.md §5" in text
    assert "it defaults to `digits`" in text and "the paper's are cifar10, svhn and stl10" in text
    assert "--dataset digits8 --epochs 4" in text   # a flag is never split at its hyphen
    readme = " ".join((ROOT / "README.md").read_text().split())
    sentence = readme[readme.index("Defaults follow the paper"):][:600]
    assert "160 epochs" in sentence and "`digits`" in sentence and "cifar10" in sentence, sentence


def test_describe_stages_help_says_it_counts_flops(capsys):
    text = _help(["describe"], capsys)
    stages = text[text.index("--stages G "):]
    assert "FLOPs" in stages and "nothing is timed" in stages and "time each module" not in text
    assert "dataset and its image size" in text


def test_estimate_table_stays_aligned_with_long_group_names():
    """Columns are as wide as their widest entry: every row's numbers end at the header's
    right edges, whatever the group's name."""
    from contsup.study import estimate as est
    groups = [{"group": g, "runs": n, "pflops": p, "gpu_hours": h}
              for g, n, p, h in [("e2e", 4, 1.5, 0.25), ("figure4-authors-and-a-longer-name", 12, 123.45, 10.5),
                                 ("table1", 1234, 0.01, 1234.567)]]
    result = {"profile": "paper", "groups": groups, "total": {"runs": 1250, "pflops": 125.0, "gpu_hours": 1245.3},
              "assumptions": {"device": "H100", "peak_tflops": 400, "precision": "tf32", "utilisation": 0.05,
                              "counted": "conv + matmul", "utilisation_basis": "a judgement"}}
    lines = est.format_table(result).splitlines()
    header, rows = lines[1], lines[2:5] + [lines[6]]
    assert lines[5] == "-" * len(header)
    ends = [header.index(name) + len(name) for name in ("runs", "PFLOPs", "GPU-hours")]
    for row, (first, *values) in zip(rows, [(g["group"], str(g["runs"]), f"{g['pflops']:.2f}",
                                               f"{g['gpu_hours']:.3f}") for g in groups] + [("total", "1250", "125.00",
                                                                                            "1245.300")]):
        assert row.startswith(first + " ") and len(row) == len(header), row
        assert [row.index(v, len(first)) + len(v) for v in values] == ends, (row, header)
