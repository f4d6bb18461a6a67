"""`python -m contsup reproduce`: runs go through the 02_train notebook (papermill, one process
per notebook), a failing run does not stop the others, a rerun skips what is finished, bad
input exits 2, notebooks side by side leave the working directory and the paths alone, two
reproduces on one folder train each run once, a stop signal ends the whole process tree."""
import json
import os
import signal
import subprocess
import threading
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from contsup.study import experiments, grid, kernels, reproduce, runs
from contsup.cli import main


@pytest.fixture(scope="module")
def first_pass(tmp_path_factory):
    """Three smoke runs of one group, the middle one broken (mode R16 needs K >= 16, which
    only the network refuses, inside train()); one slot, so one papermill execution for all."""
    out = tmp_path_factory.mktemp("reproduce")
    e2e, r0 = experiments.expand("motivation", "smoke", out)[:2]
    broken_cfg = replace(r0.config, k=4, mode="R16", out_dir=str(out / "runs" / "broken"))
    broken = experiments.Run("motivation", "broken", broken_cfg, "cifar10", "resnet32")
    runs = [e2e, broken, r0]
    summary = reproduce.reproduce("smoke", out, runs=runs, notebook_per="chunk", analysis=False, progress=False,
                                  devices="cpu", jobs=1)
    return out, runs, summary


def test_failure_does_not_stop_the_others(first_pass, capsys):
    out, (e2e, broken, r0), summary = first_pass
    assert summary["exit_code"] == 1
    assert (summary["done"], summary["skipped"], summary["failed"]) == (2, 0, 1)
    for run in (e2e, r0):
        result = json.loads((run.out_dir / "result.json").read_text())
        assert result["epochs"] == 1 and 0 <= result["final_error"] <= 100
    status = {s["name"]: s for s in summary["runs"]}
    assert status["broken"]["status"] == "failed"
    assert "R16" in status["broken"]["error"] and "\n" not in status["broken"]["error"]
    notebook = out / "notebooks" / "02_train-01.ipynb"
    assert status["broken"]["notebook"] == str(notebook) and notebook.exists()
    # the executed notebook trained all three and ended on the failure check
    cells = json.loads(notebook.read_text())["cells"]
    assert any("AssertionError" in json.dumps(c.get("outputs", [])) for c in cells)
    assert json.loads((out / "summary.json").read_text())["failed"] == 1


def test_rerun_skips_finished_runs(first_pass, capsys):
    out, (e2e, broken, r0), _ = first_pass
    mtimes = {r.name: (r.out_dir / "result.json").stat().st_mtime_ns for r in (e2e, r0)}
    # per-run notebooks this time: only the broken run is tried again, in its own folder
    summary = reproduce.reproduce("smoke", out, runs=[e2e, broken, r0], notebook_per="run",
                                  analysis=False, progress=False)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 2, 1)
    assert {r.name: (r.out_dir / "result.json").stat().st_mtime_ns for r in (e2e, r0)} == mtimes
    assert (broken.out_dir / "02_train.ipynb").exists()
    printed = capsys.readouterr().out
    assert "2 skipped" in printed and "broken: " in printed and "R16" in printed
    assert str(broken.out_dir / "02_train.ipynb") in printed


def test_missing_analysis_notebook_is_skipped_with_a_note(tmp_path, capsys):
    result = kernels.run_notebooks(["99_not_written_yet.ipynb"], tmp_path, "smoke", tmp_path / "figures")
    assert result[0]["status"] == "missing"
    assert "does not exist yet" in capsys.readouterr().out


@pytest.mark.parametrize("argv,hint", [
    (["reproduce", "--profile", "fast"], "paper, quick, smoke"),
    (["reproduce", "--profile", "smoke", "--only", "table9"], "table1"),
    (["reproduce", "--notebook-per", "cell"], "invalid choice"),
    (["reproduce", "--profile", "smoke", "--only", "e2e", "--jobs", "0"], "--jobs must be a positive integer"),
])
def test_bad_input_exits_2_with_one_line(argv, hint, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("contsup: error: ") and err.count("\n") == 1 and hint in err
    assert not (tmp_path / "out").exists()


def test_finished_run_of_another_config_is_flagged_not_reused(first_pass):
    out, (e2e, _, _), _ = first_pass
    changed = replace(e2e, config=replace(e2e.config, epochs=3))  # e.g. the profile's scaling changed
    before = (e2e.out_dir / "result.json").stat().st_mtime_ns
    [status] = grid.run_all([changed], out, progress=False)
    assert status["status"] == "failed" and "differs in ['epochs']" in status["error"]
    assert (e2e.out_dir / "result.json").stat().st_mtime_ns == before


def test_two_jobs_side_by_side_leave_paths_and_working_directory_alone(tmp_path, monkeypatch):
    """Issue 10: notebooks executed side by side once shared one process, whose working
    directory papermill changes; it ended in notebooks/, where summary.json and the figures
    then landed. Relative --out and --figures-dir must mean the caller's directory."""
    monkeypatch.chdir(tmp_path)
    runs = experiments.expand("table1", "smoke", "res")  # 4 runs, folders given relative
    summary = reproduce.reproduce("smoke", "res", runs=runs, figures_dir="figs", progress=False,
                                  devices="cpu", jobs=2)
    assert os.getcwd() == str(tmp_path)
    assert summary["exit_code"] == 0 and summary["devices"] == ["cpu", "cpu"]
    assert [s["status"] for s in summary["runs"]] == ["done"] * 4
    assert {s["slot"] for s in summary["runs"]} == {0, 1}  # both processes trained runs
    for run in runs:
        assert (tmp_path / run.out_dir / "result.json").exists()
    assert json.loads((tmp_path / "res" / "summary.json").read_text())["done"] == 4
    assert [n["status"] for n in summary["notebooks"]] == ["done", "done"]
    assert list((tmp_path / "figs").glob("*.png"))
    assert not (kernels.NOTEBOOKS / "res").exists() and not (kernels.NOTEBOOKS / "figs").exists()


def test_train_jobs_keeps_the_trainers_error_record(tmp_path, capsys):
    from contsup.jsonio import loads_strict
    from contsup.train import TrainConfig
    cfg = TrainConfig(dataset="digits8", arch="resnet32", k=4, mode="R1E", epochs=1, warmup_epochs=0, lr=1e6,
                      batch_size=64, train_subset=256, out_dir=str(tmp_path / "nan"), device="cpu")
    results = runs.train_jobs([cfg], progress=False)
    assert results["nan"]["error"].startswith("DivergedError: the loss of ")
    record = loads_strict((tmp_path / "nan" / "error.json").read_text())
    assert {"epoch", "step", "module", "losses", "traceback"} <= set(record)
    assert f"epoch {record['epoch']}, step {record['step']}" in record["error"]
    assert None in record["losses"] and "FAILED" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# Other processes and signals (issue 16): two reproduces on one folder; SIGTERM
DRIVER = """
import sys
from dataclasses import replace
from pathlib import Path
from contsup.study import experiments, kernels, reproduce
out, notebooks = Path(sys.argv[1]), sys.argv[2]
if notebooks != "-":
    kernels.NOTEBOOKS = Path(notebooks)
runs = [replace(r, config=replace(r.config, epochs=2)) for r in experiments.expand("motivation", "smoke", out)[:2]]
summary = reproduce.reproduce("smoke", out, runs=runs, notebook_per="run", analysis=False, progress=False,
                              devices="cpu", jobs=1)
sys.exit(summary["exit_code"])
"""
GATE_CELL = """import os, time
import contsup.train as _train
_evaluate, _calls = _train.evaluate, []
def _gated(*args):  # epoch 0 is checkpointed; epoch 1 waits until the test creates the gate file
    _calls.append(1)
    if len(_calls) == 2:
        while not os.path.exists(os.environ["CONTSUP_TEST_GATE"]):
            time.sleep(0.05)
    return _evaluate(*args)
_train.evaluate = _gated
"""


def two_epoch_runs(out):
    """The runs DRIVER trains: the first two smoke runs of the motivation group, two epochs each."""
    return [replace(r, config=replace(r.config, epochs=2)) for r in experiments.expand("motivation", "smoke", out)[:2]]


def gated_notebooks(folder):
    """A copy of 02_train.ipynb whose runs stop before their second evaluation until the file
    $CONTSUP_TEST_GATE exists: a run that is surely still training when the test acts."""
    nb = json.loads((kernels.NOTEBOOKS / kernels.TRAIN_NOTEBOOK).read_text())
    at = next(i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", []))
    nb["cells"].insert(at + 1, {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                                "source": GATE_CELL})
    folder.mkdir()
    (folder / kernels.TRAIN_NOTEBOOK).write_text(json.dumps(nb))
    return folder


def start(tmp_path, out, notebooks, marker):
    env = {**os.environ, "CONTSUP_TEST_GATE": str(tmp_path / "gate"), "CONTSUP_TEST_MARKER": marker}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(out), str(notebooks)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, process):
    """Until `condition()` is true (a file appeared); fails at once if `process` ended first."""
    while not (found := condition()):
        if process.poll() is not None:
            pytest.fail(f"the process ended first: {process.communicate()}")
        time.sleep(0.05)
    return found


def marked_processes(marker):
    """Live processes whose environment carries CONTSUP_TEST_MARKER=marker (zombies have none)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                environ = (p / "environ").read_bytes()
            except OSError:
                continue
            if f"CONTSUP_TEST_MARKER={marker}".encode() in environ.split(b"\0"):
                pids.append(int(p.name))
    return pids


def epochs_of(run):
    return [json.loads(line)["epoch"] for line in (run.out_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_reproduces_on_one_folder_train_every_run_once(tmp_path):
    """Issue 16: two `reproduce`s on one --out both trained every run (metrics.jsonl read epochs
    [0, 0]). Now A trains the first run (held at its second epoch by the gate), B passes it
    over and trains the other one, then waits for A's; each run is trained once and both
    summaries say so."""
    out, marker = tmp_path / "out", uuid.uuid4().hex
    runs = two_epoch_runs(out)
    a = start(tmp_path, out, gated_notebooks(tmp_path / "gated"), marker)
    [first] = wait_for(lambda: [r for r in runs if (r.out_dir / "ckpt.pt").exists()], a)
    [second] = [r for r in runs if r is not first]
    b = start(tmp_path, out, "-", marker)
    wait_for(lambda: (second.out_dir / "result.json").exists(), b)  # B trained it while A holds the first
    (tmp_path / "gate").touch()
    (a_out, a_err), (b_out, b_err) = a.communicate(timeout=600), b.communicate(timeout=600)
    assert (a.returncode, b.returncode) == (0, 0), (a_err, b_err)
    for printed in (a_out, b_out):
        assert "2 runs: 1 done, 0 skipped (already finished), 1 trained by another process meanwhile, 0 failed" \
            in printed
    for run in runs:
        assert epochs_of(run) == [0, 1]  # trained once: no epoch twice
    summary = json.loads((out / "summary.json").read_text())  # the one written last
    status = {r["name"]: r for r in summary["runs"]}
    assert sorted(r["status"] for r in summary["runs"]) == ["done", "elsewhere"]
    other = next(r for r in summary["runs"] if r["status"] == "elsewhere")
    assert f"pid {a.pid if other['name'] == first.name else b.pid} " in other["trained_by"]
    assert status[other["name"]]["train_seconds"] is not None
    assert not marked_processes(marker)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds leftover processes through /proc")
def test_sigterm_stops_the_whole_tree_marks_interrupted_and_a_rerun_resumes(tmp_path):
    """Issue 16: SIGTERM used to end `reproduce` at once and silently, while its papermill
    process and kernel went on training. Now: one line, exit 143, no process of the tree
    left, the running run marked interrupted; a rerun resumes it from its checkpoint."""
    out, marker = tmp_path / "out", uuid.uuid4().hex
    runs = two_epoch_runs(out)
    a = start(tmp_path, out, gated_notebooks(tmp_path / "gated"), marker)
    [first] = wait_for(lambda: [r for r in runs if (r.out_dir / "ckpt.pt").exists()], a)
    assert len(marked_processes(marker)) >= 3  # reproduce, papermill, the kernel
    a.send_signal(signal.SIGTERM)
    printed, err = a.communicate(timeout=120)
    assert a.returncode == 143
    assert err.count("\n") == 1 and err.startswith("contsup: stopped by SIGTERM; 1 runs interrupted"), err
    assert not marked_processes(marker)
    summary = json.loads((out / "summary.json").read_text())
    status = {r["name"]: r["status"] for r in summary["runs"]}
    assert status == {r.name: "interrupted" if r is first else "pending" for r in runs}
    assert (summary["exit_code"], summary["signal"], summary["interrupted"]) == (143, "SIGTERM", 1)
    assert not (first.out_dir / "result.json").exists() and epochs_of(first) == [0]

    again = reproduce.reproduce("smoke", out, runs=runs, notebook_per="chunk", analysis=False, progress=False,
                                devices="cpu", jobs=1)
    assert (again["exit_code"], again["done"]) == (0, 2)
    assert epochs_of(first) == [0, 1]  # resumed at epoch 1, epoch 0 not trained again


def test_train_jobs_passes_over_a_run_folder_another_process_holds(tmp_path, monkeypatch, capsys):
    """`train` refuses a run folder another process holds (RunFolderBusy); the notebook then
    writes nothing into that folder and does not count it as failed (reproduce waits for it)."""
    from contsup.runlock import RunFolderBusy
    from contsup.train import TrainConfig
    cfg = TrainConfig(dataset="digits8", epochs=1, out_dir=str(tmp_path / "held"), device="cpu")

    def busy(cfg, resume, progress):
        raise RunFolderBusy(f"{cfg.out_dir} is in use by pid 1 on elsewhere since now", {"pid": "1"})

    monkeypatch.setattr(runs, "train", busy)
    results = runs.train_jobs([cfg], progress=False)
    assert results["held"]["busy"] and "in use by pid 1" in results["held"]["error"]
    assert runs.failures(results) == {}
    assert not (tmp_path / "held").exists()  # not even error.json
    assert "held: passed over" in capsys.readouterr().out


def test_sigterm_while_waiting_for_another_process_ends_the_wait(tmp_path, monkeypatch, capsys):
    """The wait for a run another process holds (a blocking lock) ends on SIGTERM as well:
    exit 143, the run listed as pending, nothing executed."""
    from contsup.runlock import run_lock
    [held] = experiments.expand("table1", "smoke", tmp_path)[:1]
    waiting = threading.Event()
    monkeypatch.setattr(kernels, "execute", lambda *args: pytest.fail("a held run was handed to a notebook"))
    monkeypatch.setattr(grid.tqdm, "write", lambda line: waiting.set())  # "waiting for <run>: ..."

    def terminate_once_waiting():
        waiting.wait()
        os.kill(os.getpid(), signal.SIGTERM)

    with run_lock(held.out_dir):  # another writer of the run folder
        threading.Thread(target=terminate_once_waiting, daemon=True).start()
        summary = reproduce.reproduce("smoke", tmp_path, runs=[held], analysis=False, progress=False,
                                      devices="cpu", jobs=1)
    assert (summary["exit_code"], summary["pending"], summary["signal"]) == (143, 1, "SIGTERM")
    assert capsys.readouterr().err.startswith("contsup: stopped by SIGTERM; 0 runs interrupted")
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][0]["status"] == "pending"
