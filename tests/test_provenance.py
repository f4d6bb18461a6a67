"""What made a result (issue 22, points 5 and 10): result.json names torch's version, the
device, the thread count and the code's commit; a resume never loses a metrics line without
a word: the checkpoint keeps the rows and restores them, and a checkpoint of an older
version that keeps none has the missing epochs named in one line."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from contsup import provenance
from contsup.study import runs
from contsup.cli import main

TINY = ["--dataset", "digits8", "-k", "2", "--mode", "R1E", "--epochs", "3", "--batch-size", "64",
        "--train-subset", "128", "--warmup-epochs", "0", "--no-progress", "--device", "cpu"]


def epochs_of(run: Path) -> list:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def killed_in_epoch_1(tmp_path_factory, second_evaluation_interrupt):
    """TINY (3 epochs) stopped in epoch 1, after epoch 0's checkpoint; a copy per test."""
    out = tmp_path_factory.mktemp("killed") / "run"
    with pytest.MonkeyPatch.context() as mp:
        second_evaluation_interrupt(mp)
        assert main(["train", *TINY, "--out", str(out)]) == 130
    assert epochs_of(out) == [0]
    return out


@pytest.fixture
def run(killed_in_epoch_1, tmp_path):
    shutil.copytree(killed_in_epoch_1, tmp_path / "run")
    return tmp_path / "run"


def resume(run: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(run), "--resume"]) == 0
    return capsys.readouterr().err


def as_older_version(run: Path):
    """The checkpoint as versions before the metrics rows and facts were kept wrote it."""
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    del ckpt["metrics"], ckpt["run_facts"]
    torch.save(ckpt, run / "ckpt.pt")


# --------------------------------------------------------------------------------------
# Point 10: metrics lost while a run was stopped
def test_a_plain_resume_keeps_every_line_and_says_nothing(run, capsys):
    epoch0 = (run / "metrics.jsonl").read_text()
    assert resume(run, capsys) == ""
    assert epochs_of(run) == [0, 1, 2]
    assert (run / "metrics.jsonl").read_text().startswith(epoch0)
    assert "epochs_without_metrics" not in json.loads((run / "result.json").read_text())


@pytest.mark.parametrize("damage", ["deleted", "damaged line", "damaged, then a later epoch's line", "emptied",
                                    "not text"])
def test_a_lost_metrics_line_is_restored_from_the_checkpoint_in_one_line(run, capsys, damage):
    metrics = run / "metrics.jsonl"
    epoch0 = metrics.read_text()
    if damage == "deleted":
        metrics.unlink()
    elif damage == "damaged line":
        metrics.write_text(epoch0[:len(epoch0) // 2] + "\n")
    elif damage == "emptied":
        metrics.write_text("")
    elif damage == "not text":
        metrics.write_bytes(b"\xff\xfe" + epoch0.encode())
    else:   # epoch 1's line written, the kill came before its checkpoint: dropped as always
        metrics.write_text("{garbage\n" + json.dumps({"epoch": 1, "test_error": 1.0, "epoch_seconds": 1.0}) + "\n")
    err = resume(run, capsys)
    assert epochs_of(run) == [0, 1, 2]
    assert metrics.read_text().startswith(epoch0)   # epoch 0's line as it was written
    assert json.loads(metrics.read_text().splitlines()[1])["test_error"] != 1.0
    why = {"deleted": "is missing", "damaged line": "has damaged lines [1]", "emptied": "lacks or changed them",
           "damaged, then a later epoch's line": "has damaged lines [1]", "not text": "is unreadable"}
    assert err == f"contsup: note: metrics of epochs 0 restored from ckpt.pt (metrics.jsonl {why[damage]})\n"
    result = json.loads((run / "result.json").read_text())
    assert "epochs_without_metrics" not in result
    assert result["train_seconds"] == pytest.approx(sum(json.loads(l)["epoch_seconds"]
                                                        for l in metrics.read_text().splitlines()))


@pytest.mark.parametrize("damage", ["deleted", "damaged line"])
def test_an_older_checkpoint_names_the_epochs_it_cannot_restore(run, capsys, damage):
    as_older_version(run)
    metrics = run / "metrics.jsonl"
    if damage == "deleted":
        metrics.unlink()
    else:   # the last line damaged reads as cut short by a kill: dropped, and now named
        metrics.write_text(metrics.read_text()[:20] + "\n")
    err = resume(run, capsys)
    assert err.count("\n") == 1 and err.startswith("contsup: warning: epochs 0 have no metrics line and ckpt.pt "
                                                   "keeps none to restore"), err
    assert epochs_of(run) == [1, 2]
    assert json.loads((run / "result.json").read_text())["epochs_without_metrics"] == [0]


def test_an_older_checkpoint_still_resumes_silently_with_its_lines(run, capsys):
    as_older_version(run)
    assert resume(run, capsys) == ""
    assert epochs_of(run) == [0, 1, 2]
    result = json.loads((run / "result.json").read_text())
    # its epoch 0 ran under facts nobody recorded: the result says from which epoch they hold
    assert [p["from_epoch"] for p in result["facts_by_part"]] == [1]


def test_the_checkpoint_keeps_the_rows_of_metrics_jsonl(run):
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["metrics"] == [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------
# Point 5: result.json says what made it
def test_result_json_names_torch_the_device_the_threads_and_the_commit(run, capsys):
    resume(run, capsys)
    result = json.loads((run / "result.json").read_text())
    assert result["torch_version"] == str(torch.__version__)
    assert result["threads"] == torch.get_num_threads()
    assert isinstance(result["device_name"], str) and result["device_name"]
    assert result["commit"] == provenance.code_commit()
    assert "facts_by_part" not in result   # resumed under the same facts: one part
    assert set(provenance.run_facts(torch.device("cpu"))) == set(provenance.FACTS)
    row = runs.collect(run.parent).iloc[0]    # the study's table shows them
    assert {f: row[f] for f in provenance.FACTS} == {f: result[f] for f in provenance.FACTS}
    assert not row["mixed_facts"]


def test_a_resume_under_other_threads_records_each_part(run, capsys, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    resume(run, capsys)
    result = json.loads((run / "result.json").read_text())
    assert result["threads"] == threads + 1
    assert [(p["from_epoch"], p["threads"]) for p in result["facts_by_part"]] == [(0, threads), (1, threads + 1)]
    assert runs.collect(run.parent).iloc[0]["mixed_facts"]


def test_a_pipelined_run_records_them_too(tmp_path):
    from contsup.pipeline import train_pipelined
    from contsup.train import TrainConfig
    cfg = TrainConfig(dataset="digits8", k=2, epochs=1, batch_size=64, train_subset=64, warmup_epochs=0,
                      out_dir=str(tmp_path / "run"), device="cpu")
    result = train_pipelined(cfg, progress=False)
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result
    assert result["world_size"] == 1 and result["threads"] == torch.get_num_threads()
    assert result["torch_version"] == str(torch.__version__) and result["commit"] == provenance.code_commit()
    assert result["device_name"] == provenance.device_name(torch.device("cpu"))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["metrics"] == [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_the_facts_are_read_once_per_run_not_per_epoch(tmp_path, monkeypatch):
    calls = []
    real = provenance.run_facts

    def counted(device):
        calls.append(device)
        return real(device)
    import contsup.train as train_module
    monkeypatch.setattr(train_module, "run_facts", counted)
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 0
    assert calls == [torch.device("cpu")]


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to make a checkout")
def test_the_commit_is_the_checkouts_with_a_dirty_mark(tmp_path):
    root = tmp_path / "checkout"
    (root / "contsup").mkdir(parents=True)
    (root / "contsup" / "a.py").write_text("x = 1\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance.code_commit(root) == head
    (root / "notes.txt").write_text("untracked, outside the package: not a change of the code\n")
    assert provenance.code_commit(root) == head
    (root / "contsup" / "b.py").write_text("new code\n")
    assert provenance.code_commit(root) == head + "-dirty"
    (root / "contsup" / "b.py").unlink()
    (root / "contsup" / "a.py").write_text("x = 2\n")
    assert provenance.code_commit(root) == head + "-dirty"
    # a folder inside another checkout is not a checkout of the package: no commit
    assert provenance.code_commit(root / "contsup") is None


def test_no_git_or_no_checkout_is_null_never_a_failure(tmp_path, monkeypatch):
    assert provenance.code_commit(tmp_path) is None   # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path))          # no git at all
    assert provenance.code_commit() is None
    facts = provenance.run_facts(torch.device("cpu"))
    assert facts["commit"] is None and facts["threads"] == torch.get_num_threads()


def test_the_device_name_is_the_gpus_model_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Fake GPU {device}")
    assert provenance.device_name(torch.device("cuda", 1)) == "Fake GPU cuda:1"
    monkeypatch.setattr(provenance, "cpu_model", lambda: None)
    assert provenance.device_name(torch.device("cpu")) == "cpu"

    def broken(device=None):
        raise RuntimeError("no driver")
    monkeypatch.setattr(torch.cuda, "get_device_name", broken)
    assert provenance.device_name(torch.device("cuda")) == "cuda"   # a fact, never a failure
