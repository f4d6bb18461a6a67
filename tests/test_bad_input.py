"""Every bad input: one line on stderr, a non-zero exit, and every file on disk as it was.

One table of cases, each an argv for `contsup.cli.main` plus a setup that prepares files
in the case's own tmp folder (a copy of one tiny finished run, fake datasets in their real
on-disk formats from test_data.py, stray files where folders should be). Each case checks:
the exit status, exactly one stderr line starting with `contsup: error:` (at most 200
characters, not counting paths the user typed), no traceback, and that the whole tmp
folder tree (names and bytes) is unchanged, but for the stamp in a run folder's `.lock` (see `tree`). A few cases run `python -m contsup` in a real
process; the notebook parameters of 02_train are checked through `notebook_jobs` and one
papermill execution.
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torchvision.datasets.utils as tv_utils

from contsup.study import experiments, kernels, reproduce, runs as run_folders
from contsup.cli import main
from contsup.errors import UsageError
from test_data import rand_u8, write_cifar, write_stl10, write_svhn

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--dataset", "digits8", "--arch", "resnet32", "-k", "2", "--mode", "R1E", "--batch-size", "32",
         "--train-subset", "64", "--epochs", "1", "--warmup-epochs", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One finished tiny run (config.json, metrics.jsonl, ckpt.pt, result.json); cases copy it."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["train", *SMOKE, "--out", str(out)]) == 0
    return out


# --------------------------------------------------------------------------------------
# Setups: each gets the case's tmp folder and the smoke run, and prepares files.
def finished(t, run):
    shutil.copytree(run, t / "run")


def unfinished(t, run):  # as if killed after the last checkpoint, before result.json
    finished(t, run)
    (t / "run" / "result.json").unlink()


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def also(*steps):
    def setup(t, run):
        for step in steps:
            step(t, run)
    return setup


def a_file(rel, text="not a folder\n"):
    def setup(t, run):
        (t / rel).parent.mkdir(parents=True, exist_ok=True)
        (t / rel).write_text(text)
    return setup


def cut(rel, keep=0.5):
    return lambda t, run: truncate(t / rel, keep)


def delete(rel):
    return lambda t, run: (t / rel).unlink()


def cifar(t, run):
    write_cifar(t / "data", rand_u8(10, 3072, seed=1), np.arange(10), rand_u8(4, 3072, seed=2), np.arange(4))


def svhn(t, run):
    write_svhn(t / "data", rand_u8(32, 32, 3, 6, seed=3), [1, 2, 3, 4, 5, 10], rand_u8(32, 32, 3, 3, seed=4), [1, 2, 3])


def stl10(t, run):
    per = 3 * 96 * 96
    write_stl10(t / "data", rand_u8(4 * per, seed=5), [1, 2, 3, 4], rand_u8(2 * per, seed=6), [5, 6])


def truncated_cache(t, run):
    (t / "data").mkdir()
    torch.save({"version": 1, "name": "cifar10", "train_x": torch.zeros(10, 3, 32, 32, dtype=torch.uint8)},
               t / "data" / "cifar10_uint8.pt")
    truncate(t / "data" / "cifar10_uint8.pt")


def not_a_checkpoint(t, run):
    unfinished(t, run)
    torch.save({"weights": torch.zeros(3)}, t / "run" / "ckpt.pt")


def checkpoint_of_other_weights(t, run):  # every key there, the weights of another network
    unfinished(t, run)
    ckpt = torch.load(t / "run" / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "model": {"fc.weight": torch.zeros(2, 2)}}, t / "run" / "ckpt.pt")


def started_no_checkpoint(t, run):  # killed during its first epoch: config and metrics, no ckpt
    finished(t, run)
    for name in ("ckpt.pt", "result.json"):
        (t / "run" / name).unlink()


def finished_e2e_run_with_truncated_result(t, run):
    e2e = experiments.expand("e2e", "smoke", t / "results")[0]
    shutil.copytree(run, e2e.out_dir)
    truncate(e2e.out_dir / "result.json")


DELETE = object()


def edit_json(rel, **fields):
    """Hand-edit a JSON file of the run: set (or, with DELETE, remove) top-level fields."""
    def setup(t, run):
        path = t / rel
        record = json.loads(path.read_text())
        record.update(fields)
        path.write_text(json.dumps({k: v for k, v in record.items() if v is not DELETE}))
    return setup


def edit_checkpoint(**fields):
    def setup(t, run):
        path = t / "run" / "ckpt.pt"
        ckpt = torch.load(path, weights_only=True) | fields
        torch.save({k: v for k, v in ckpt.items() if v is not DELETE}, path)
    return setup


old_checkpoint = edit_checkpoint(metrics=DELETE, run_facts=DELETE)   # as written before they were kept


def read_only_parent(t, run):
    (t / "locked").mkdir()
    os.chmod(t / "locked", 0o555)


def nothing(t, run):
    pass


# --------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: list              # "{t}" stands for the case's tmp folder
    hint: str               # a piece of the one stderr line
    setup: Callable = nothing
    code: int = 2
    skip: str | None = None


TRAIN = ["train", *SMOKE, "--out", "{t}/run"]
DATA = ["train", "--dataset", "{name}", "--data-root", "{t}/data", "--out", "{t}/run", "--epochs", "1", "--no-progress"]


def data_case(id, name, setup, hint):
    return Case(id, [a.replace("{name}", name) for a in DATA], hint, setup)


CASES = [
    # train: numbers out of range, NaN and infinity (TrainConfig / ModelConfig refuse them)
    Case("lr-nan", TRAIN + ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    Case("lr-inf", TRAIN + ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    Case("lr-overflows-to-inf", TRAIN + ["--lr", "1e400"], "--lr must be a finite number"),
    Case("lr-zero", TRAIN + ["--lr", "0"], "--lr must be a finite number > 0"),
    Case("lr-negative", TRAIN + ["--lr", "-0.1"], "--lr must be a finite number > 0"),
    Case("lr-not-a-number", TRAIN + ["--lr", "fast"], "invalid float value"),
    Case("widen-nan", TRAIN + ["--widen", "nan"], "--widen must be a finite number"),
    Case("widen-zero", TRAIN + ["--widen", "0"], "--widen must be a finite number >= 0.125"),
    Case("widen-huge", TRAIN + ["--widen", "1e6"], "<= 16"),
    Case("loss-scales-nan", TRAIN + ["--reconstruct", "--loss-scales", "1,nan,0,0"], "four numbers, finite and >= 0"),
    Case("loss-scales-inf", TRAIN + ["--reconstruct", "--loss-scales", "1,1,inf,0"], "four numbers, finite"),
    Case("loss-scales-negative", TRAIN + ["--reconstruct", "--loss-scales=-1,1,0,0"], ">= 0"),
    Case("loss-scales-three", TRAIN + ["--reconstruct", "--loss-scales", "1,1,0"], "four numbers"),
    Case("loss-scales-without-reconstruct", TRAIN + ["--loss-scales", "5,1,0,0"], "add --reconstruct"),
    Case("epochs-zero", TRAIN + ["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    Case("epochs-fraction", TRAIN + ["--epochs", "2.5"], "invalid int value"),
    Case("batch-size-negative", TRAIN + ["--batch-size", "-4"], "--batch-size must be a positive integer"),
    Case("warmup-negative", TRAIN + ["--warmup-epochs", "-1"], "--warmup-epochs must be an integer >= 0"),
    Case("train-subset-zero", TRAIN + ["--train-subset", "0"], "--train-subset must be a positive integer"),
    Case("train-subset-too-big", TRAIN + ["--train-subset", "99999"], "1..1297"),
    Case("seed-negative", TRAIN + ["--seed", "-1"], "--seed must be an integer in 0.."),
    Case("seed-overflow", TRAIN + ["--seed", str(2**64)], "--seed must be an integer in 0.."),
    # train: names and combinations
    Case("dataset-capitals", TRAIN + ["--dataset", "CIFAR10"], "choose one of: cifar10"),
    Case("k-not-in-table", TRAIN + ["-k", "5"], "choose K from"),
    Case("mode-needs-more-modules", TRAIN + ["--mode", "R8"], "use K >= 8"),
    Case("context-impl", TRAIN + ["--context-impl", "fast"], "invalid choice"),
    Case("device", TRAIN + ["--device", "tpu"], "choose auto, cpu"),
    Case("device-meta", TRAIN + ["--device", "meta"], "choose auto, cpu"),
    Case("device-mps-missing", TRAIN + ["--device", "mps"], "no Apple GPU",
         skip="this machine has an Apple GPU" if torch.backends.mps.is_available() else None),
    Case("unknown-flag", TRAIN + ["--lrr", "0.1"], "unrecognized arguments: --lrr 0.1 (see `python -m contsup train --help`)"),
    Case("no-subcommand", [], "(see `python -m contsup --help`)"),
    Case("out-empty", ["train", *SMOKE, "--out", ""], "--out must be a non-empty string"),
    Case("data-root-empty", TRAIN + ["--data-root", ""], "--data-root must be a non-empty string"),
    # train: --out and --resume against what is on disk
    Case("out-is-a-file", TRAIN, "is a file, not a folder", a_file("run")),
    Case("out-under-a-file", ["train", *SMOKE, "--out", "{t}/run/sub"], "is a file, not a folder", a_file("run")),
    Case("resume-out-is-a-file", TRAIN + ["--resume"], "is a file, not a folder", a_file("run")),
    Case("out-read-only", ["train", *SMOKE, "--out", "{t}/locked/run"], "no permission to write",
         read_only_parent, skip="root may write anywhere" if os.geteuid() == 0 else None),
    Case("out-name-too-long", ["train", *SMOKE, "--out", "{t}/" + "a" * 300], "File name too long", code=1),
    Case("finished-without-resume", TRAIN, "pass --resume", finished),
    Case("resume-finished-other-k", TRAIN + ["--resume", "-k", "4"], "differs in ['k']", finished),
    Case("resume-finished-other-lr", TRAIN + ["--resume", "--lr", "0.2"], "differs in ['lr']", finished),
    Case("resume-unfinished-other-seed", TRAIN + ["--resume", "--seed", "1"], "differs in ['seed']", unfinished),
    Case("resume-unfinished-bf16", TRAIN + ["--resume", "--bf16"], "differs in ['bf16']", unfinished),
    Case("resume-truncated-ckpt", TRAIN + ["--resume"], "unreadable", also(unfinished, cut("run/ckpt.pt"))),
    Case("resume-foreign-ckpt", TRAIN + ["--resume"], "not a checkpoint of this trainer", not_a_checkpoint),
    Case("resume-ckpt-other-weights", TRAIN + ["--resume"], "does not fit this network", checkpoint_of_other_weights),
    Case("resume-truncated-result", TRAIN + ["--resume"], "result.json is unreadable (JSONDecodeError)",
         also(finished, cut("run/result.json"))),
    Case("resume-truncated-config-finished", TRAIN + ["--resume"], "config.json is unreadable",
         also(finished, cut("run/config.json"))),
    Case("resume-truncated-config-unfinished", TRAIN + ["--resume"], "config.json is unreadable",
         also(unfinished, cut("run/config.json"))),
    Case("resume-config-is-a-list", TRAIN + ["--resume"], "holds a list", also(unfinished, a_file("run/config.json", "[]"))),
    Case("started-without-resume", TRAIN, "stopped before its first checkpoint", started_no_checkpoint),
    Case("resume-started-other-k", TRAIN + ["--resume", "-k", "4"], "config.json was written by a different config",
         started_no_checkpoint),
    Case("resume-foreign-config-json", TRAIN + ["--resume"], "config.json is unreadable",
         a_file("run/config.json", "[settings]\nkey = 1\n")),
    # a fresh start into a folder holding another config's run: named, --resume would not help
    Case("started-other-seed-without-resume", TRAIN + ["--seed", "1"], "differs in ['seed']", started_no_checkpoint),
    Case("finished-other-seed-without-resume", TRAIN + ["--seed", "1"], "differs in ['seed']", finished),
    # hand-edited run files: the file and its field named
    Case("resume-result-final-error-a-string", TRAIN + ["--resume"], "result.json: 'final_error' is '12.5', not a number",
         also(finished, edit_json("run/result.json", final_error="12.5"))),
    Case("resume-result-empty", TRAIN + ["--resume"], "result.json has no 'final_error' (a number)",
         also(finished, a_file("run/result.json", "{}"))),
    Case("resume-result-without-config", TRAIN + ["--resume"], "result.json has no 'config' (a dict)",
         also(finished, edit_json("run/result.json", config=DELETE))),
    Case("resume-result-best-epoch-null", TRAIN + ["--resume"], "'best_epoch' is None, not an integer >= 0",
         also(finished, edit_json("run/result.json", best_epoch=None))),
    Case("resume-result-paper-memory-a-string", TRAIN + ["--resume"], "'paper_memory_bytes' is 'big', not a number",
         also(finished, edit_json("run/result.json", paper_memory_bytes="big"))),
    Case("resume-ckpt-epoch-a-string", TRAIN + ["--resume"], "ckpt.pt: 'epoch' is '0', not an integer >= 0",
         also(unfinished, edit_checkpoint(epoch="0"))),
    Case("resume-ckpt-best-none", TRAIN + ["--resume"], "ckpt.pt: 'best' is None, not [error, epoch]",
         also(unfinished, edit_checkpoint(best=None))),
    Case("resume-ckpt-no-optimizer", TRAIN + ["--resume"], "ckpt.pt has no 'optimizer' (a dict)",
         also(unfinished, edit_checkpoint(optimizer=DELETE))),
    Case("resume-ckpt-rng-a-list", TRAIN + ["--resume"], "ckpt.pt: 'torch_rng' is [1, 2], not a tensor",
         also(unfinished, edit_checkpoint(torch_rng=[1, 2]))),
    Case("resume-ckpt-epoch-past-the-end", TRAIN + ["--resume"], "'epoch' is 5, past the run's last epoch 0",
         also(unfinished, edit_checkpoint(epoch=5))),
    # a checkpoint of an older version (no metrics rows to restore from): a damaged line is refused
    Case("resume-metrics-test-error-a-string", TRAIN + ["--resume"], "metrics.jsonl line 1: 'test_error' is 'x'",
         also(unfinished, old_checkpoint,
              a_file("run/metrics.jsonl", '{"epoch": 0, "test_error": "x", "epoch_seconds": 1.0}\n'))),
    Case("resume-metrics-line-not-json", TRAIN + ["--resume"], "metrics.jsonl line 1 is not JSON",
         also(unfinished, old_checkpoint, a_file("run/metrics.jsonl", '{"epoch": 0, \n{"epoch": 1}\n'))),
    Case("resume-config-seed-a-string", TRAIN + ["--resume"], "config.json was written by a different config "
         "(differs in ['seed'])", also(unfinished, edit_json("run/config.json", seed="0"))),
    # datasets half-downloaded (torchvision's layout, tiny fake files)
    data_case("cifar10-batch-missing", "cifar10", also(cifar, delete("data/cifar-10-batches-py/data_batch_3")),
              "download --dataset cifar10"),
    data_case("cifar10-batch-truncated", "cifar10", also(cifar, cut("data/cifar-10-batches-py/data_batch_2")),
              "delete cifar-10-batches-py/"),
    data_case("cifar10-meta-missing", "cifar10", also(cifar, delete("data/cifar-10-batches-py/batches.meta")),
              "add --download"),
    data_case("svhn-mat-missing", "svhn", also(svhn, delete("data/test_32x32.mat")), "download --dataset svhn"),
    data_case("svhn-mat-truncated", "svhn", also(svhn, cut("data/train_32x32.mat", 0.3)), "delete train_32x32.mat"),
    data_case("stl10-binary-truncated", "stl10", also(stl10, cut("data/stl10_binary/train_X.bin", 0.9)),
              "delete stl10_binary/"),
    data_case("stl10-labels-missing", "stl10", also(stl10, delete("data/stl10_binary/test_y.bin")), "download"),
    data_case("uint8-cache-truncated", "cifar10", truncated_cache, "download --dataset cifar10"),
    data_case("data-root-is-a-file", "cifar10", a_file("data"), "--data-root"),
    # describe
    Case("describe-widen-inf", ["describe", "--widen", "inf", "--no-memory"], "--widen must be a finite number"),
    Case("describe-batch-one", ["describe", "--batch-size", "1"], ">= 2"),
    Case("describe-k-zero", ["describe", "-k", "0", "--no-memory"], "-k must be a positive integer"),
    Case("describe-loss-scales-nan", ["describe", "--reconstruct", "--loss-scales", "nan,1,0,0", "--no-memory"],
         "four numbers"),
    # download
    Case("download-digits", ["download", "--dataset", "digits8"], "scikit-learn"),
    Case("download-unknown", ["download", "--dataset", "mnist"], "choose one of"),
    Case("download-missing-dataset", ["download"], "--dataset"),
    Case("download-root-is-a-file", ["download", "--dataset", "cifar10", "--data-root", "{t}/data"],
         "is a file, not a folder", a_file("data")),
    # reproduce
    Case("reproduce-profile", ["reproduce", "--profile", "fast", "--out", "{t}/res"], "paper, quick, smoke"),
    Case("reproduce-group", ["reproduce", "--profile", "smoke", "--only", "table9", "--out", "{t}/res"], "table1"),
    Case("reproduce-jobs-zero", ["reproduce", "--profile", "smoke", "--jobs", "0", "--out", "{t}/res"],
         "--jobs must be a positive integer"),
    Case("reproduce-jobs-word", ["reproduce", "--jobs", "two", "--out", "{t}/res"], "invalid int value"),
    Case("reproduce-out-is-a-file", ["reproduce", "--profile", "smoke", "--out", "{t}/res"], "is a file", a_file("res")),
    Case("reproduce-figures-dir-is-a-file",
         ["reproduce", "--profile", "smoke", "--out", "{t}/res", "--figures-dir", "{t}/fig"], "--figures-dir",
         a_file("fig")),
    Case("reproduce-truncated-result", ["reproduce", "--profile", "smoke", "--only", "e2e", "--out", "{t}/results",
                                        "--no-progress"], "result.json is unreadable",
         finished_e2e_run_with_truncated_result),
    # estimate
    Case("estimate-utilisation-nan", ["estimate", "--utilisation", "nan"], "--utilisation must be a fraction"),
    Case("estimate-utilisation-above-one", ["estimate", "--utilisation", "1.5"], "(0, 1]"),
    Case("estimate-peak-inf", ["estimate", "--peak-tflops", "inf"], "--peak-tflops must be a positive number"),
    Case("estimate-peak-negative", ["estimate", "--peak-tflops", "-5"], "--peak-tflops"),
    Case("estimate-precision", ["estimate", "--precision", "fp8"], "tf32, bf16"),
    Case("estimate-profile", ["estimate", "--profile", "nope"], "paper, quick, smoke"),
    Case("estimate-two-formats", ["estimate", "--json", "--markdown"], "not allowed with argument"),
    # not an error: --resume on an empty folder says so in one line, then trains (one step)
    Case("resume-empty-folder", ["train", "--dataset", "digits8", "-k", "2", "--batch-size", "32", "--train-subset",
                                 "32", "--epochs", "1", "--no-progress", "--device", "cpu", "--out", "{t}/run",
                                 "--resume"],
         "contsup: note: nothing to resume in", lambda t, run: (t / "run").mkdir(), code=0),
]


def tree(root: Path) -> dict:
    """Every folder and file under root: relative name -> bytes (None for a folder). A run
    folder's `.lock` counts by its name only: it says who took the lock last (runlock), and
    a command refused after taking the lock restamps it."""
    return {str(p.relative_to(root)): (None if p.is_dir() else "lock" if p.name == ".lock" else p.read_bytes())
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, smoke_run, tmp_path, capsys, monkeypatch):
    if case.skip:
        pytest.skip(case.skip)
    # Our fake dataset files cannot match torchvision's md5 sums; with the check passing,
    # a truncated file reaches torchvision's readers, the harder case (a missing file
    # still fails: check_integrity is `isfile(...) and check_md5(...)`).
    monkeypatch.setattr(tv_utils, "check_md5", lambda *a, **kw: True)
    monkeypatch.chdir(tmp_path)           # default output folders land in the snapshot too
    case.setup(tmp_path, smoke_run)
    before = tree(tmp_path)
    capsys.readouterr()
    argv = [a.replace("{t}", str(tmp_path)) for a in case.argv]
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == case.code, err
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("contsup: error: " if code else "contsup: note: "), err
    own_words = lines[0]
    for text in sorted([a for a in argv if len(a) > 20] + [str(tmp_path)], key=len, reverse=True):
        own_words = own_words.replace(text, "T")  # paths and values the user typed don't count
    assert len(own_words) <= 200, lines[0]
    assert "Traceback" not in err
    assert case.hint in lines[0], lines[0]
    after = tree(tmp_path)
    if code:
        assert after == before            # nothing touched, nothing created
    else:
        assert {k: after.get(k) for k in before} == before  # new files only


def test_there_are_at_least_30_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


# --------------------------------------------------------------------------------------
# A real process: the exit status end to end, and no traceback.
@pytest.mark.parametrize("argv,setup", [
    (["train", "--lr", "nan", "--out", "{t}/run"], nothing),
    (["train", *SMOKE, "--out", "{t}/run"], a_file("run")),
], ids=["lr-nan", "out-is-a-file"])
def test_real_process(argv, setup, tmp_path):
    setup(tmp_path, None)
    before = tree(tmp_path)
    p = subprocess.run([sys.executable, "-m", "contsup", *[a.replace("{t}", str(tmp_path)) for a in argv]],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1 and p.stderr.startswith("contsup: error: ")
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------------------
# Notebook parameters: 02_train.ipynb hands `runs` (or single-config parameters) to notebook_jobs.
GOOD = {"dataset": "digits8", "k": 2, "mode": "R1E", "epochs": 1, "batch_size": 32, "train_subset": 64}
NOTEBOOK_CASES = [
    ({"runs": [{**GOOD, "kk": 2}]}, "runs[0]: unknown config keys ['kk'] (did you mean ['k']?)"),
    ({"runs": [GOOD, {**GOOD, "k": "4", "out_dir": "/x/run2"}]}, "runs[1] (/x/run2): -k must be a positive integer, got '4'"),
    ({"runs": [{**GOOD, "lr": float("nan")}]}, "--lr must be a finite number > 0, got nan"),
    ({"runs": [{**GOOD, "epochs": 2.0}]}, "--epochs must be a positive integer, got 2.0"),
    ({"runs": [{**GOOD, "reconstruct": "false"}]}, "reconstruct must be True or False, got 'false'"),
    ({"runs": [{**GOOD, "loss_scales": "5,1,0,0", "reconstruct": True}]}, "four numbers"),
    ({"runs": [{**GOOD, "widen": None}]}, "--widen must be a finite number"),
    ({"runs": [{**GOOD, "out_dir": 7}]}, "--out must be a non-empty string, got 7"),
    ({"runs": GOOD}, "runs must be a list of config dicts, got dict"),
    ({"runs": ["digits8"]}, "a run config is a dict of TrainConfig fields, got str"),
    ({"config": {**GOOD, "k": -1}}, "-k must be a positive integer, got -1"),
    ({"config": {**GOOD, "seed": 1.5}}, "--seed must be an integer"),
]


@pytest.mark.parametrize("params,hint", NOTEBOOK_CASES, ids=[h[:40] for _, h in NOTEBOOK_CASES])
def test_notebook_parameters(params, hint, tmp_path):
    with pytest.raises(UsageError) as e:
        run_folders.notebook_jobs(params.get("config", GOOD), str(tmp_path / "run"), params.get("runs"))
    message = str(e.value)
    assert "\n" not in message and len(message) <= 200 and hint in message, message
    assert not (tmp_path / "run").exists()


def test_notebook_bad_key_is_the_runs_one_line_error(tmp_path):
    """Through papermill as `reproduce` runs it: the failure is one line naming the key."""
    kernels.check_kernel()
    params = {"runs": [{**GOOD, "out_dir": str(tmp_path / "run"), "warmup": 0}], "progress": False}
    error = kernels.execute(kernels.NOTEBOOKS / kernels.TRAIN_NOTEBOOK, tmp_path / "02.ipynb", params,
                              env=kernels.kernel_environment(threads=1))
    assert error is not None and "\n" not in error
    assert error.startswith("UsageError: runs[0]") and "unknown config keys ['warmup']" in error
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------
def test_resume_drops_a_metrics_line_cut_short_by_a_kill(smoke_run, tmp_path, capsys):
    """Killed while writing epoch 1's metrics line (before its checkpoint): resume drops the
    partial line instead of failing on it, and finishes from the epoch-0 checkpoint."""
    unfinished(tmp_path, smoke_run)
    metrics = tmp_path / "run" / "metrics.jsonl"
    complete = metrics.read_text()
    metrics.write_text(complete + '{"epoch": 1, "lr": 0.0')
    assert main(["train", *SMOKE, "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert metrics.read_text() == complete
    assert capsys.readouterr().err == ""
