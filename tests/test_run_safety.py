"""A run folder under schedulers, shared folders and hostile file systems (issue 16).

One writer per run folder; default folder names that do not collide; SIGTERM/SIGHUP stop a
run in one line, keeping its last checkpoint for an exact --resume; a full disk leaves the
previous checkpoint and no .tmp; the terminal's encoding never fails the output; a finished
run resumed only reads. Every wait here is on an event (a file appearing, a process ending),
never on a guessed time: a process to interrupt is paused by the test's own driver right
after its first checkpoint, until the test has done its part.
"""
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from contsup import jsonio
from contsup.cli import main
from contsup.errors import Stopped, exit_status, stop_on_signals
from contsup.runlock import run_lock
from contsup.rundir import atomic_save, run_name
from contsup.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
def tiny(epochs: int) -> list:
    return ["--dataset", "digits8", "-k", "2", "--mode", "R1E", "--epochs", str(epochs), "--batch-size", "64",
            "--train-subset", "128", "--warmup-epochs", "0", "--no-progress", "--device", "cpu"]


TINY = tiny(2)
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}  # every process trains with the same threads: the same floats
WAIT_S = 600  # only a bound on a hung test: every wait below ends on its event

# Runs `contsup` in a real process, pausing it right after its first checkpoint is on disk:
# it then writes argv[1] and waits until argv[2] exists (or a signal stops it).
PAUSE_AFTER_FIRST_CHECKPOINT = r"""
import sys, time
from pathlib import Path
import contsup.rundir as rundir
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
real_save = rundir.atomic_save
def save(obj, path, as_json=False):
    real_save(obj, path, as_json)
    if path.name == "ckpt.pt" and not ready.exists():
        ready.write_text("")
        while not go.exists():
            time.sleep(0.01)
rundir.atomic_save = save
from contsup.cli import main
sys.exit(main(sys.argv[3:]))
"""


def contsup(*argv, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "contsup", *argv], capture_output=True, text=True, cwd=cwd,
                          env=kwargs.pop("env", ENV), timeout=WAIT_S, **kwargs)


def start_paused(tmp_path, *argv) -> tuple[subprocess.Popen, Path]:
    """`contsup argv` in a process that pauses after its first checkpoint; returns it once paused,
    and the file whose creation lets it go on."""
    ready, go = tmp_path / "paused", tmp_path / "go"
    p = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_FIRST_CHECKPOINT, str(ready), str(go), *argv],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + WAIT_S
    while not ready.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the run never reached its first checkpoint: {p.communicate()}")
        time.sleep(0.01)
    return p, go


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def epochs_of(run: Path) -> list:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """TINY trained without interruption, in a real process (the same threads as the others)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    p = contsup("train", *TINY, "--out", str(out))
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture
def interrupted(interrupt_in_second_evaluation, tmp_path) -> Path:
    """TINY stopped after epoch 0's checkpoint (in this process): ckpt.pt of epoch 0, no result."""
    out = tmp_path / "run"
    restore = interrupt_in_second_evaluation()
    assert main(["train", *TINY, "--out", str(out)]) == 130
    restore()
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 0 and epochs_of(out) == [0]
    return out


# --------------------------------------------------------------------------------------
# One writer per run folder
def test_a_second_writer_gets_one_line_naming_the_holder_and_touches_nothing(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "result.json").unlink()   # an unfinished run: resuming it would write
    with run_lock(run):              # this process is the writer now
        before = tree(run)
        for extra in (["--resume"], [], ["--seed", "1"], ["--seed", "1", "--resume"]):
            assert main(["train", *TINY, "--out", str(run), *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("contsup: error: ") and "Traceback" not in err
            assert f"in use by pid {os.getpid()} on " in err, err
            assert tree(run) == before   # not config.json, not metrics.jsonl, not even .lock
    # the holder gone (in any way), the folder is free again
    assert main(["train", *TINY, "--out", str(run), "--resume"]) == 0


def test_a_failed_block_leaves_no_lock_and_no_folder(tmp_path):
    with pytest.raises(KeyError), run_lock(tmp_path / "a" / "b" / "run"):
        raise KeyError("refused")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(KeyError), run_lock(tmp_path / "run"):
        raise KeyError("refused")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]


def test_a_waiter_locks_the_new_file_when_the_holder_removes_its_own(tmp_path, monkeypatch):
    """The holder's block fails and removes the lock file it made, while a blocking taker has
    it open: the taker must not keep a lock on the removed file (two holders at once)."""
    import threading
    from contsup import runlock
    folder, opened, held, release = tmp_path / "run", threading.Event(), threading.Event(), threading.Event()
    real_flock = runlock.fcntl.flock

    def flock(fd, op):
        if threading.current_thread() is not threading.main_thread():
            opened.set()   # the waiter has the (soon removed) file open
        return real_flock(fd, op)

    monkeypatch.setattr(runlock.fcntl, "flock", flock)

    def waiter():
        with run_lock(folder, blocking=True):
            held.set()
            release.wait()

    with pytest.raises(KeyError), run_lock(folder):
        thread = threading.Thread(target=waiter)
        thread.start()
        assert opened.wait(WAIT_S)
        raise KeyError("refused")
    assert held.wait(WAIT_S)
    try:
        assert runlock.is_locked(folder)   # the file at <folder>/.lock is the one the waiter holds
        with pytest.raises(runlock.RunFolderBusy):
            with run_lock(folder):
                pass
    finally:
        release.set()
        thread.join()


def test_two_train_commands_on_one_folder(reference, tmp_path, capsys):
    """The second identical command, and a --resume, while the first trains: refused with its pid;
    the first finishes with one line per epoch and its own train_seconds."""
    run = tmp_path / "run"
    first, go = start_paused(tmp_path, "train", *TINY, "--out", str(run))
    before = tree(run)
    for extra in ([], ["--resume"]):
        assert main(["train", *TINY, "--out", str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {first.pid} on " in err and err.count("\n") == 1, err
    assert tree(run) == before
    go.write_text("")
    out, err = first.communicate(timeout=WAIT_S)
    assert first.returncode == 0, err
    assert epochs_of(run) == [0, 1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((run / "result.json").read_text())["train_seconds"] == sum(r["epoch_seconds"] for r in rows)


# --------------------------------------------------------------------------------------
# Default folder names
def test_two_seeds_without_out_land_in_two_folders(tmp_path):
    argv = ["train", *tiny(1)]
    procs = [subprocess.Popen([sys.executable, "-m", "contsup", *argv, "--seed", str(seed)], cwd=tmp_path, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=WAIT_S)
        assert p.returncode == 0, err
    folders = sorted((tmp_path / "runs").iterdir())
    name = "digits8-resnet32-K2-R1E-softmax-epochs1-batch_size64-warmup_epochs0-train_subset128"
    assert [f.name for f in folders] == [name, name + "-seed1"]
    for folder, seed in zip(folders, (0, 1)):
        assert json.loads((folder / "result.json").read_text())["config"]["seed"] == seed
        assert epochs_of(folder) == [0]


def test_the_default_name_holds_every_setting_that_is_not_the_default():
    assert run_name(TrainConfig()) == "digits-resnet32-K4-R1E-softmax"
    assert run_name(TrainConfig(dataset="cifar10", batch_size=1024, lr=0.8)) == "cifar10-resnet32-K4-R1E-softmax"  # its recipe
    changes = {"head": "0c1f", "reconstruct": True, "loss_scales": (5.0, 1.0, 0.0, 0.0), "balanced": True,
               "widen": 2.0, "bf16": True, "epochs": 3, "batch_size": 7, "lr": 0.05, "warmup_epochs": 0,
               "train_subset": 10, "seed": 3}
    names = {run_name(TrainConfig(**({"reconstruct": True} if name == "loss_scales" else {}) | {name: value}))
             for name, value in changes.items()}
    assert len(names) == len(changes)   # each setting changes the name
    full = run_name(TrainConfig(**changes))
    assert full == ("digits-resnet32-K4-R1E-softmax-head0c1f-reconstruct-loss_scales5.0,1.0,0.0,0.0-balanced"
                    "-widen2.0-bf16-epochs3-batch_size7-lr0.05-warmup_epochs0-train_subset10-seed3")
    # where and how fast a run trains is not in its name (it may change on --resume)
    speed = TrainConfig(device="cpu", data_root="elsewhere", channels_last=False, context_impl="plain",
                        torch_compile=True, cudnn_benchmark=False, reuse_cpu_memory=False)
    assert run_name(speed) == run_name(TrainConfig())
    # a wrapped backbone's arch names a folder every file system accepts
    assert run_name(TrainConfig(arch="torchvision:resnet18")) == "digits-torchvision_resnet18-K4-R1E-softmax"


def test_a_fresh_start_into_a_folder_of_another_config_is_refused(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert main(["train", *TINY, "--seed", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "was written by a different config (differs in ['seed'])" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------
# Signals
def test_sigterm_stops_in_one_line_and_resume_continues_exactly(reference, tmp_path):
    run = tmp_path / "run"
    p, _ = start_paused(tmp_path, "train", *TINY, "--out", str(run))
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=WAIT_S)
    assert p.returncode == 128 + signal.SIGTERM == 143, err
    assert err.count("\n") == 1 and err.startswith("contsup: stopped by SIGTERM") and "--resume" in err, err
    assert torch.load(run / "ckpt.pt", weights_only=True)["epoch"] == 0
    assert not list(run.glob("*.tmp")) and epochs_of(run) == [0]

    resumed = contsup("train", *TINY, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    mine, theirs = (torch.load(r / "ckpt.pt", weights_only=True) for r in (run, reference))
    assert mine["model"].keys() == theirs["model"].keys()
    assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in mine["model"])
    strip = lambda r: [{k: v for k, v in json.loads(l).items() if k not in ("epoch_seconds", "images_per_s")}
                       for l in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(run) == strip(reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_is_a_keyboard_interrupt_with_its_exit_status(signum):
    previous = signal.getsignal(signum)
    with pytest.raises(KeyboardInterrupt) as e:   # what every Ctrl-C cleanup already catches
        with stop_on_signals():
            try:
                signal.raise_signal(signum)   # to this thread: its handler runs as the call returns
            finally:   # cleanup after the first: a second signal does not cut it short
                signal.raise_signal(signum)
    assert isinstance(e.value, Stopped) and exit_status(e.value) == 128 + signum
    assert str(e.value) == signal.Signals(signum).name
    assert signal.getsignal(signum) == previous   # put back on the way out


def test_a_signal_during_a_checkpoint_write_leaves_the_old_file_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"epoch": 0, "w": torch.zeros(3)}, path)
    before = path.read_bytes()
    real_fsync = os.fsync

    def fsync_then_signal(fd):  # the new bytes are in ckpt.pt.tmp, not yet renamed
        real_fsync(fd)
        assert len(list(tmp_path.glob("ckpt.pt.*.tmp"))) == 1
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(os, "fsync", fsync_then_signal)
    with pytest.raises(Stopped), stop_on_signals():
        atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# --------------------------------------------------------------------------------------
# Write failures
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(interrupted, capsys):
    ckpt = interrupted / "ckpt.pt"
    before = ckpt.read_bytes()
    limit = len(before) // 2   # metrics lines and JSON fit, a checkpoint does not: as on a full disk
    p = contsup("train", *TINY, "--out", str(interrupted), "--resume",
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"contsup: error: cannot write {ckpt} (File too large); it was left as it was")
    assert ckpt.read_bytes() == before and not list(interrupted.glob("*.tmp"))
    # room again: --resume trains epoch 1 once more (its line from the failed attempt is dropped),
    # and removes what a writer killed mid-write (SIGKILL) could not
    (interrupted / "ckpt.pt.999-1.tmp").write_bytes(before[:100])
    assert main(["train", *TINY, "--out", str(interrupted), "--resume"]) == 0
    assert epochs_of(interrupted) == [0, 1] and not list(interrupted.glob("*.tmp"))


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT])
def test_a_failed_metrics_append_leaves_no_half_line(tmp_path, monkeypatch, error):
    path = tmp_path / "metrics.jsonl"
    jsonio.append_line(path, {"epoch": 0})
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of the line
        real_write(fd, bytes(data[:5]))
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError) as e:
        jsonio.append_line(path, {"epoch": 1, "test_error": 50.0})
    monkeypatch.undo()
    assert path.read_bytes() == before and str(path) in e.value.strerror and "\n" not in e.value.strerror


def test_a_failed_json_write_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    jsonio.save(path, {"final_error": 1.0})
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="cannot write .*result.json \\(Input/output error\\)"):
        jsonio.save(path, {"final_error": 2.0})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["result.json"]


# --------------------------------------------------------------------------------------
# Output and read-only folders
def test_an_ascii_terminal_and_a_non_ascii_folder(reference, tmp_path):
    run = tmp_path / "lauf-\u00e9t\u00e9"
    shutil.copytree(reference, run)
    p = contsup("train", *TINY, "--out", str(run), "--resume", env={**ENV, "PYTHONIOENCODING": "ascii"})
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "lauf-\\xe9t\\xe9: test error " in p.stdout, p.stdout


def _forbid_writes_under(root: Path):
    """An audit hook (for the rest of the process; active while the returned list holds True)
    that refuses any write, creation, rename or removal under `root`, and records it."""
    attempts, active = [], [False]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if not active[0] or event not in ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate",
                                          "os.chmod", "os.utime", "os.symlink", "os.link"):
            return
        path = args[0]
        if not isinstance(path, (str, bytes, os.PathLike)) or not str(os.fsdecode(path)).startswith(str(root)):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            if not ((mode and any(c in mode for c in "wax+")) or (flags and flags & write_flags)):
                return
        attempts.append((event, str(path)))
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    sys.addaudithook(hook)
    return attempts, active


def test_resuming_a_finished_run_only_reads(reference, tmp_path, capsys):
    """Checked without chmod (root writes anyway): every write under the folder fails, and none is tried."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / ".lock").unlink()   # a folder that never saw this version: no lock file to lean on
    before = tree(run)
    attempts, active = _forbid_writes_under(tmp_path)
    active[0] = True
    try:
        code = main(["train", *TINY, "--out", str(run), "--resume"])
    finally:
        active[0] = False
    captured = capsys.readouterr()
    assert code == 0 and attempts == [] and captured.err == "", (attempts, captured.err)
    assert captured.out.startswith(f"{run}: test error ")
    assert tree(run) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway (chmod has no effect); "
                                              "test_resuming_a_finished_run_only_reads covers it")
def test_resuming_a_finished_run_in_a_read_only_folder(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    os.chmod(run, 0o555)
    try:
        p = contsup("train", *TINY, "--out", str(run), "--resume")
    finally:
        os.chmod(run, 0o755)
    assert p.returncode == 0 and p.stderr == "", p.stderr
