"""Executing notebooks with papermill, each in a process of its own, and stopping them.

Every notebook runs in a process of its own (`python -m papermill`, working directory
`notebooks/`, its own environment). Nothing process-wide -- the working directory,
environment variables -- is shared by notebooks that run side by side, and every path is
made absolute once, at the start. (papermill's `cwd=` changes the working directory of the
whole process: two notebooks executed from two threads of one process once left it in
`notebooks/`, and the results and figures landed there.)

SIGTERM, SIGINT and SIGHUP stop every notebook's whole process tree (`Notebooks`).
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import errors
from ..errors import UsageError

# jupyter_client and yaml come with the `notebooks` extra: imported where a notebook is run, so
# that `contsup train` and the CLI work without them.

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the repository root in a checkout
NOTEBOOKS = PACKAGE_PARENT / "notebooks"
TRAIN_NOTEBOOK = "02_train.ipynb"
KERNEL = "python3"


def check_kernel(kernel_name: str = KERNEL) -> None:
    """The kernel must exist and run this interpreter (or a plain `python`, which
    jupyter_client replaces by sys.executable)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise UsageError(f"no Jupyter kernel '{kernel_name}'; install it with "
                         f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel_name}`") from None
    exe = spec.argv[0]
    if exe not in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}") \
            and Path(exe).resolve() != Path(sys.executable).resolve():
        print(f"note: kernel '{kernel_name}' runs {exe}, not {sys.executable}; if its imports fail, run "
              f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel_name}`", file=sys.stderr)


def kernel_environment(threads: int | None = None) -> dict:
    """The environment of a notebook process and of its kernel: this very copy of contsup on
    PYTHONPATH (installed or not), and OpenMP threads that sleep instead of spinning while
    they wait: on a shared machine, spinning torch threads of two busy processes slow each
    other's small steps by orders of magnitude, and OMP_WAIT_POLICY=PASSIVE avoids it. With `threads`, that many OpenMP threads (processes
    side by side share the cores). A value the user has set is kept. A copy: os.environ
    itself is never changed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def execute(notebook: Path, output: Path, parameters: dict, env: dict | None = None) -> str | None:
    """Run a notebook with papermill in a child process (working directory: the notebook's
    folder; environment: `env`, else `kernel_environment()`); None on success, else the
    one-line error. The child heads a process group of its own, and it and everything it
    starts (the kernel, in a session of its own) carry a marker in their environment, so that
    `NOTEBOOKS_RUNNING.stop()` ends the whole tree (see `Notebooks`)."""
    import yaml  # papermill's own parameter format (it comes with papermill, not with `train`'s needs)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)  # an earlier execution's error must not pass for this one's
    fd, params = tempfile.mkstemp(prefix="contsup-parameters-", suffix=".yaml")
    env, marker = NOTEBOOKS_RUNNING.mark(env or kernel_environment())
    try:
        with os.fdopen(fd, "w") as f:  # safe_dump writes floats that read back as floats (1e-05 -> 1.0e-05)
            yaml.safe_dump(parameters, f)
        child = subprocess.Popen(
            [sys.executable, "-m", "papermill", str(notebook), str(output), "-f", params, "-k", KERNEL,
             "--cwd", str(notebook.parent), "--no-progress-bar", "--no-log-output", "--log-level", "ERROR"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)  # a terminal's Ctrl-C reaches `reproduce` only, which stops the tree
        NOTEBOOKS_RUNNING.add(child, marker)
        _, stderr = child.communicate()  # (a stop signal leaves it registered: `stop()` ends it)
        NOTEBOOKS_RUNNING.remove(child)
    finally:
        os.unlink(params)
    if child.returncode == 0:
        return None
    last = [line.strip() for line in stderr.splitlines() if line.strip()][-1:]
    return _notebook_error(output) or (last[0] if last else f"papermill exited with status {child.returncode}")


# --------------------------------------------------------------------------------------
# Stopping: SIGTERM, SIGINT and SIGHUP end every notebook process tree, then `reproduce`
STOP_SIGNALS = (*errors.STOP_SIGNALS, signal.SIGINT)   # errors.stop_on_signals raises Stopped for each
MARKER = "CONTSUP_NOTEBOOK"  # environment variable naming the process tree of one notebook


def _marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries `MARKER=marker`: a notebook process, its
    kernel (which jupyter_client starts in a session of its own) and what they started.
    [] where there is no /proc (then the kernel ends on its own once its parent is gone:
    ipykernel's parent poller)."""
    needle, pids = f"{MARKER}={marker}".encode(), []
    proc = Path("/proc")
    for p in proc.iterdir() if proc.is_dir() else ():
        if p.name.isdigit():
            try:
                environ = (p / "environ").read_bytes()  # empty for a zombie: it counts as gone
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                pids.append(int(p.name))
    return pids


class Notebooks:
    """The notebook processes running now. `stop()` ends each one's whole tree -- papermill,
    its kernel and whatever they started -- and waits for it: no process goes on training
    into a run folder after `reproduce` has ended (a rerun would race it)."""

    def __init__(self):
        self.lock, self.running, self.stopping = threading.Lock(), {}, False
        self.count = itertools.count(1)

    def mark(self, env: dict) -> tuple[dict, str]:
        marker = f"{os.getpid()}-{next(self.count)}"
        return {**env, MARKER: marker}, marker

    def add(self, child, marker: str) -> None:
        with self.lock:
            self.running[child] = marker
            late = self.stopping  # started while stopping: it goes at once
        if late:
            self._stop({child: marker})

    def remove(self, child) -> None:
        with self.lock:
            self.running.pop(child, None)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every process group of every tree; SIGKILL to what is left after `grace`
        seconds; returns once all are gone. No notebook starts afterwards."""
        with self.lock:
            self.stopping = True
            running = dict(self.running)
        self._stop(running, grace)
        with self.lock:
            for child in running:
                self.running.pop(child, None)

    def reset(self) -> None:
        with self.lock:
            self.stopping = False

    def _stop(self, running: dict, grace: float = 10.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            groups = {child.pid for child in running}  # each child heads its own group
            for marker in running.values():
                for pid in _marked_pids(marker):
                    try:
                        groups.add(os.getpgid(pid))
                    except ProcessLookupError:
                        pass
            groups.discard(os.getpgrp())
            for group in groups:
                try:
                    os.killpg(group, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                left = [c for c in running if c.returncode is None and _wait(c, 0.05)] + \
                       [p for m in running.values() for p in _marked_pids(m)]
                if not left:
                    return
                time.sleep(0.05)


def _wait(child, seconds: float) -> bool:
    """Whether `child` still runs after waiting up to `seconds` for it."""
    try:
        child.wait(seconds)
        return False
    except subprocess.TimeoutExpired:
        return True


NOTEBOOKS_RUNNING = Notebooks()


def _notebook_error(output: Path) -> str | None:
    """The error the executed notebook's failing cell raised, as one line."""
    try:
        cells = json.loads(output.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return None
    for cell in cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                ename, evalue = o.get("ename", "Error"), o.get("evalue", "")
                return f"{ename}: {evalue}".splitlines()[0] if evalue else ename
    return None


def run_notebooks(names, out: Path, profile: str, figures_dir: Path) -> list[dict]:
    """Execute the analysis notebooks that exist; a missing one is skipped with a note."""
    params = {"results_dir": str(out.resolve()), "profile": profile, "figures_dir": str(figures_dir.resolve())}
    results = []
    for name in names:
        src = NOTEBOOKS / name
        if not src.exists():
            print(f"note: {src} does not exist yet; skipped")
            results.append({"notebook": name, "status": "missing", "error": None, "output": None})
            continue
        output = out / "notebooks" / name
        t0 = time.perf_counter()
        print(f"executing {name} ...", flush=True)
        error = execute(src, output, params)
        results.append({"notebook": name, "status": "failed" if error else "done", "error": error,
                        "output": str(output), "seconds": round(time.perf_counter() - t0, 1)})
    return results
