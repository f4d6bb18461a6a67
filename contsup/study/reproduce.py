"""`python -m contsup reproduce`: train every run of a profile, then build tables and figures.

    python -m contsup reproduce --profile quick|paper|smoke [--only GROUP ...] [--out DIR]
                                [--devices auto|cpu|cuda:0,cuda:1,...] [--jobs N] [--shard I/N]
    python -m contsup reproduce --profile ... --report

Each run is trained by executing `notebooks/02_train.ipynb` with papermill and lands in
its own folder `<out>/runs/<name>/` (config.json, metrics.jsonl, ckpt.pt, result.json).

How the grid is executed:

- Every notebook runs in a process of its own (`python -m papermill`, working directory
  `notebooks/`, its own environment). Nothing process-wide -- the working directory,
  environment variables -- is shared by notebooks that run side by side, and every path is
  made absolute once, at the start. (papermill's `cwd=` changes the working directory of
  the whole process: two notebooks executed from two threads of one process once left it
  in `notebooks/`, and the results and figures landed there.)
- `--devices` names the devices, `--jobs` how many notebook processes each runs at a time
  (the *slots*): `auto` is every visible CUDA GPU, one process each, else the CPU;
  `cuda:0,cuda:1,...` names GPUs; `cpu` with `--jobs N` runs N CPU processes (default: 2
  for quick and smoke on 2+ cores, else 1). A GPU slot's process sees only its GPU
  (CUDA_VISIBLE_DEVICES, `slot_environment`) and its runs' `device` is `cuda` (the device
  may change on resume); summary.json names each run's physical GPU (`gpu`). With several
  slots, each process gets cores/slots OpenMP threads.
- Datasets that runs download are fetched once before the slots start (`prefetch_data`);
  the runs then never download.
- The runs wait in one shared queue, longest first, so that the last runs to finish are
  short ones and no slot idles while another still has a long run ahead. The order is
  `run_cost`: for `paper`, the FLOP count of `estimate.run_flops`; for quick and smoke,
  whose runs it takes minutes of CPU to count, the proxy `proxy_cost` (epochs x
  training images x conv/linear layers one step runs: at 8x8 pixels a layer's cost is
  mostly its fixed per-call overhead, whatever its width).
- `paper` executes one notebook per run, saved as `<out>/runs/<name>/02_train.ipynb`
  (a kernel's start-up is nothing next to 160 GPU epochs). `quick` and `smoke` execute
  one notebook per *chunk* of the queue, saved as `<out>/notebooks/02_train-<NN>.ipynb`: a
  free slot takes runs from the head of the queue until they cost 1/(2 x slots) of what
  is left (guided self-scheduling): large chunks of the long runs first, single short runs
  at the end: a few dozen kernel starts for the quick profile instead of one per run.
  With one slot the whole queue is one notebook. `--notebook-per run|chunk`
  overrides either default.
- `--shard I/N` trains a fixed 1/N of the runs: sorted by cost (ties by name) and dealt
  1..N, N..1, 1..N, ..., so the parts are balanced and the same on every machine. N
  machines sharing one results folder (a SLURM job array, README "Many GPUs") thus split
  the grid with no coordinator. A sharded run writes `<out>/summary-shard<I>of<N>.json`
  and leaves the tables and figures to `--report`, which trains nothing: it executes the
  analysis notebooks over whatever runs are finished and lists the missing ones.

A finished run (result.json present) is skipped; an interrupted one resumes from its
checkpoint. Other `reproduce`s on the same folder share the work run by run (`run_all`:
claims): each run is trained once, a run another process holds is waited for and listed
as `elsewhere`. SIGTERM, SIGINT and SIGHUP stop every notebook's whole process tree
(`Notebooks`), mark the running runs `interrupted` and exit 128 + the signal.
A failing run does not stop the others (nor the other slots' queue): it writes
`<run>/error.json`, is listed at the end with its one-line error and notebook, and the exit
status becomes 1. Then notebooks 01 (only with the `motivation` group; under `--report`
only when its runs are finished), 03 and 04 are executed with `results_dir`, `profile`,
`figures_dir`; their executed copies go to `<out>/notebooks/`. `<out>/summary.json`
records every run's status and slot and which runs each group uses.

The second half of this file holds the small helpers `02_train.ipynb` calls.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import data, jsonio, tables
from .. import errors
from ..errors import Stopped, UsageError, check_writable_folder, stop_on_signals
from ..runlock import RunFolderBusy, describe_holder, is_locked, read_holder, run_lock
from ..model import parse_mode
from ..rundir import config_json as _config_json, config_diff, read_run_json
from ..train import TrainConfig
from . import estimate, experiments, publish

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the repository root in a checkout
NOTEBOOKS = PACKAGE_PARENT / "notebooks"
TRAIN_NOTEBOOK = "02_train.ipynb"
KERNEL = "python3"
DEFAULT_FIGURES = {"quick": "figures", "paper": "figures/paper"}  # smoke: <out>/figures


def add_arguments(p) -> None:
    p.add_argument("--profile", default="quick", help=f"one of {', '.join(experiments.PROFILES)}")
    p.add_argument("--only", nargs="+", metavar="GROUP", default=None,
                   help=f"run only these groups: {', '.join(experiments.GROUPS)}")
    p.add_argument("--out", default=None, help="results folder (default: results/<profile>)")
    p.add_argument("--figures-dir", default=None,
                   help="where notebook 04 writes figures (default: figures/ for quick, figures/paper/ "
                        "for paper, <out>/figures for smoke)")
    p.add_argument("--notebook-per", choices=("run", "chunk"), default=None,
                   help="one 02_train notebook per run or per chunk of the queue (default: run for paper, "
                        "else chunk)")
    p.add_argument("--devices", default="auto",
                   help="auto (every visible CUDA GPU, else the CPU), cuda:0,cuda:1,... or cpu")
    p.add_argument("--jobs", type=int, default=None,
                   help="notebook processes per device at a time, each with cores/processes threads "
                        "(default: on the CPU 2 for quick and smoke with 2+ cores, else 1)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="train only part I of N of the runs (N machines sharing --out); no tables or figures")
    p.add_argument("--report", action="store_true",
                   help="train nothing: tables and figures from the finished runs; list the missing ones")
    p.add_argument("--publish-notebooks", action="store_true",
                   help="afterwards, write the executed notebooks (and 00/02 run with their defaults) back "
                        "into notebooks/ with their outputs (what `make demo` does)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------
# Executing notebooks, each in a process of its own
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


def _notebook_config(cfg: TrainConfig) -> dict:
    """The config as the notebook receives it: JSON types, absolute paths."""
    d = _config_json(cfg)
    d["out_dir"] = str(Path(cfg.out_dir).resolve())
    d["data_root"] = str(Path(cfg.data_root).resolve())
    return d


def _stale_keys(run) -> list[str]:
    """Config keys in which a finished run folder differs from what the registry asks for
    (e.g. after the quick profile's scaling changed); where a run lives may differ."""
    result = read_run_json(run.out_dir / "result.json")  # a damaged file is named now, before any training
    path = run.out_dir / "config.json"
    stored = read_run_json(path) if path.exists() else result.get("config", {})
    return config_diff(run.config, stored)


def _error_of(run) -> str | None:
    path = run.out_dir / "error.json"
    return json.loads(path.read_text())["error"] if path.exists() else None


def _finished_status(run) -> dict | None:
    """The status of a run whose folder holds a result: skipped, or failed when that result
    is of another config; None when the run has no result yet."""
    if not (run.out_dir / "result.json").exists():
        return None
    stale = _stale_keys(run)
    error = (f"{run.out_dir} holds a finished run of another config (differs in {stale}); "
             f"move it away or use another --out") if stale else None
    return {"status": "failed" if stale else "skipped", "error": error, "notebook": None}


class _Watcher(threading.Thread):
    """Advances the progress bar as runs inside a notebook finish."""

    def __init__(self, bar, runs):
        super().__init__(daemon=True)
        self.bar, self.pending, self.stop = bar, list(runs), threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            self.poll()

    def poll(self):
        done = [r for r in self.pending if (r.out_dir / "result.json").exists() or _error_of(r)]
        for r in done:
            self.pending.remove(r)
            self.bar.set_postfix_str(r.name, refresh=False)
            self.bar.update(1)


# --------------------------------------------------------------------------------------
# Devices, costs, shards
def default_jobs(profile: str, device: str = "cpu") -> int:
    """Two notebooks side by side on a CPU of 2+ cores for the small profiles: their steps are
    too small to keep two threads busy (measured: see experiments.py); one otherwise."""
    small = profile in ("quick", "smoke") and device == "cpu"
    return 2 if small and (os.cpu_count() or 1) >= 2 else 1


def check_jobs(jobs) -> None:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"--jobs must be a positive integer, got {jobs}")


def parse_devices(devices, profile: str, jobs: int | None = None) -> list[str]:
    """The slots: one device name per notebook process that runs at a time, devices taking
    turns (cuda:0, cuda:1, cuda:0, cuda:1 for two GPUs with --jobs 2). `devices`: 'auto'
    (None), 'cpu', 'mps', 'cuda:0,cuda:1,...', or a list of such names (tests use
    ['cpu', 'cpu'])."""
    if jobs is not None:
        check_jobs(jobs)
    if isinstance(devices, (list, tuple)):
        names = list(devices)
    else:
        text = "auto" if devices is None else str(devices).strip()
        if text == "auto":
            names = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            if not names:
                mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
                names = ["mps" if mps else "cpu"]
        else:
            names = [d.strip() for d in text.split(",")]
    bad = [d for d in names if d not in ("cpu", "mps") and not re.fullmatch(r"cuda:\d+", d)]
    if bad or not names:
        raise UsageError(f"--devices takes auto, cpu, or GPUs like cuda:0,cuda:1; got '{devices}'")
    gpus = [d for d in names if d.startswith("cuda")]
    if isinstance(devices, str) and len(set(gpus)) < len(gpus):
        raise UsageError(f"--devices names a GPU twice in '{devices}'; use --jobs for several processes per GPU")
    visible = torch.cuda.device_count() if gpus else 0
    missing = [d for d in gpus if int(d.split(":")[1]) >= visible]
    if missing:
        seen = f"cuda:0..cuda:{visible - 1} are visible" if visible else "no CUDA GPU is visible"
        raise UsageError(f"--devices {', '.join(missing)}: {seen}; use --devices auto or cpu")
    per_device = jobs or default_jobs(profile, names[0])
    return [d for _ in range(per_device) for d in names]


def parse_shard(shard) -> tuple[int, int]:
    """'I/N' -> (I, N) with 1 <= I <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if m is None or not 1 <= int(m[1]) <= int(m[2]):
        raise UsageError(f"--shard takes I/N with 1 <= I <= N (e.g. 2/4: the second of four machines), "
                         f"got '{shard}'")
    return int(m[1]), int(m[2])


def proxy_cost(cfg: TrainConfig) -> int:
    """A cheap stand-in for a run's cost: epochs x training images x conv/linear layers one
    step runs (the backbone's, plus per cut the head's, one per residual encoder -- the
    mode's `residual_sources`, as `ContextSupply` builds them --, two per image encoder or
    decoder). Exact enough to order small CPU runs, where a layer's time is mostly its
    per-call overhead; it ignores resolution and width, which the FLOP count
    (`estimate.run_flops`) weighs."""
    mode = parse_mode(cfg.mode, cfg.k)
    layers = 6 * tables.BLOCKS_PER_STAGE[cfg.arch] + 2
    for cut in range(cfg.k - 1):
        layers += int(cfg.head[0]) + int(cfg.head[2]) + len(mode.residual_sources(cut)) + 2 * mode.image \
            + 2 * cfg.reconstruct
    return cfg.epochs * estimate.dataset_sizes(cfg)[0] * layers


def run_cost(cfg: TrainConfig, profile: str) -> float:
    """What orders the queue and deals the shards: FLOPs for `paper`, the proxy otherwise.
    A config that cannot be costed costs 0: its training fails at once, with its message."""
    try:
        return float(estimate.run_flops(cfg) if profile == "paper" else proxy_cost(cfg))
    except Exception:  # noqa: BLE001 -- the run itself reports what is wrong with it
        return 0.0


def run_costs(runs, profile: str, progress: bool = False) -> dict[str, float]:
    """{run name: cost}; counting the paper profile's FLOPs takes a while, hence the bar."""
    show = progress and profile == "paper" and len(runs) > 1
    return {r.name: run_cost(r.config, profile)
            for r in tqdm(runs, desc="counting FLOPs to order the runs", unit="run", disable=not show)}


def longest_first(runs, cost: dict) -> list:
    return sorted(runs, key=lambda r: (-cost[r.name], r.name))


def shard_runs(runs, index: int, count: int, cost: dict) -> list:
    """Part `index` (1-based) of `count`: the runs longest first, dealt 1..N, N..1, 1..N, ...
    (each part gets one of every N runs of similar cost). Depends only on the run names and
    costs, not on which runs are finished: every machine computes the same parts."""
    def part(i):
        turn, seat = divmod(i, count)
        return seat if turn % 2 == 0 else count - 1 - seat
    return [r for i, r in enumerate(longest_first(runs, cost)) if part(i) == index - 1]


class _Queue:
    """The pending runs, longest first, shared by the slots. `take()` gives the next
    notebook's runs: one (per run), the whole queue (one slot), or runs from the head until
    they cost 1/(2 x slots) of what is left (per chunk, with several slots)."""

    def __init__(self, runs, cost: dict, slots: int, per_run: bool):
        self.runs, self.cost = longest_first(runs, cost), cost
        self.slots, self.per_run = slots, per_run
        self.left = sum(cost[r.name] for r in runs)
        self.lock, self.closed, self.taken = threading.Lock(), False, 0

    def take(self) -> tuple[int, list]:
        with self.lock:
            if self.closed or not self.runs:
                return self.taken, []
            if self.per_run:
                n = 1
            elif self.slots == 1:
                n = len(self.runs)
            else:
                share, n, chunk = self.left / (2 * self.slots), 0, 0.0
                while n < len(self.runs) and (n == 0 or chunk < share):
                    chunk += self.cost[self.runs[n].name]
                    n += 1
            batch, self.runs = self.runs[:n], self.runs[n:]
            self.left -= sum(self.cost[r.name] for r in batch)
            self.taken += 1
            return self.taken, batch

    def close(self):
        with self.lock:
            self.closed = True


# --------------------------------------------------------------------------------------
# Training the runs
CLAIM = ".reproduce"  # <run>/.reproduce/.lock: held by the `reproduce` whose notebook trains the run


def slot_environment(device: str, threads: int | None) -> tuple[dict, int | str | None, str]:
    """(environment, GPU, device name inside) of a notebook process of the slot `device`. A
    GPU slot's process sees only its GPU (CUDA_VISIBLE_DEVICES), which it calls `cuda`: no
    CUDA context of it lands on another GPU (cuda:0 above all). The GPU is named as
    CUDA_VISIBLE_DEVICES names it: its physical index, or the entry of our own
    CUDA_VISIBLE_DEVICES when that is set (under SLURM, cuda:0 may be GPU 2)."""
    env = kernel_environment(threads)
    if not device.startswith("cuda"):
        return env, None, device
    index = int(device.split(":")[1])
    ours = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    gpu = ours[index] if "CUDA_VISIBLE_DEVICES" in os.environ and index < len(ours) else str(index)
    env["CUDA_VISIBLE_DEVICES"] = gpu
    return env, int(gpu) if gpu.isdigit() else gpu, "cuda"


def prefetch_data(runs) -> list:
    """Download each dataset that runs ask to download, once, before any notebook starts (N
    slots downloading and extracting into one folder at once corrupt it); skipped when its
    cache (<data_root>/<name>_uint8.pt, what training reads) is there. The data folder's lock
    (runlock) keeps another `reproduce` -- a shard on another machine -- from downloading
    into it at the same time. Returns the runs with `download` off."""
    needed = sorted({(r.config.dataset, str(Path(r.config.data_root).resolve())) for r in runs
                     if r.config.download and r.config.dataset in data.TORCHVISION_DATASETS})
    for name, root in needed:
        if os.path.isfile(data.cache_path(name, root)):
            continue
        check_writable_folder(root, "--data-root")
        with run_lock(root, blocking=True):
            if not os.path.isfile(data.cache_path(name, root)):  # not fetched meanwhile by another process
                print(f"downloading {name} into {root} ...", flush=True)
                data.download(name, root)
    return [replace(r, config=replace(r.config, download=False)) for r in runs]


def run_all(runs, out, notebook_per: str = "run", progress: bool = True, slots=("cpu",),
            cost: dict | None = None, prefix: str = "02_train") -> list[dict]:
    """Train `runs` (a list of experiments.Run) through 02_train.ipynb, one notebook process
    per slot (a device name each) at a time, from one queue, longest first by `cost`
    ({name: cost}; default `proxy_cost`). One status dict per run: name, group, status,
    error, notebook, device, gpu, slot, out_dir, train_seconds. Chunk notebooks are saved as
    `<out>/notebooks/<prefix>-<NN>.ipynb`.

    Statuses: done (trained here), skipped (finished before we started), elsewhere (trained
    by another process meanwhile: `trained_by` names it), failed, and on a stop signal
    interrupted (its notebook was stopped) and pending (not started).

    Other processes on the same run folders (a second `reproduce` on the same --out, a
    `train` started by hand, an orphaned notebook): a run is trained only while this process
    holds its claim (`<run>/.reproduce/.lock`) and nobody holds the run folder's lock. A run
    another process holds is passed over; once the queue is empty, we wait for each such run
    (blocking locks) and take its result -- or train it, if that process stopped before the
    end. So two `reproduce`s on one folder train every run once, and both summaries are
    right. A stop signal (`Stopped`) ends every notebook's process tree; it is re-raised with
    the statuses in `rows`."""
    if notebook_per not in ("run", "chunk"):
        raise UsageError(f"unknown --notebook-per '{notebook_per}'; choose run or chunk")
    slots = list(slots)
    out = Path(out).resolve()
    status, pending = {}, []
    for run in runs:
        finished = _finished_status(run)
        if finished:
            status[run.name] = {**finished, "device": None, "gpu": None, "slot": None}
        else:
            pending.append(run)
    if pending:
        check_kernel()
    pending = prefetch_data(pending)
    given = cost or {}
    cost = {r.name: given[r.name] if r.name in given else run_cost(r.config, "quick") for r in pending}  # proxy
    notebook = NOTEBOOKS / TRAIN_NOTEBOOK
    threads = max(1, (os.cpu_count() or 1) // len(slots)) if len(slots) > 1 else None
    envs = [slot_environment(device, threads) for device in slots]
    bar = tqdm(total=len(pending), desc="runs", unit="run", disable=not progress or not pending)
    claims, deferred = {}, []  # run name -> its claim (an ExitStack); (run, holder) passed over
    lock = threading.Lock()

    def elsewhere(run, finished, holder) -> dict:
        """The status of a run another process finished (or failed) while we ran."""
        bar.update(1)
        row = {**finished, "device": None, "gpu": None, "slot": None, "trained_by": describe_holder(holder)}
        return row | ({"status": "elsewhere"} if finished["status"] == "skipped" else {})

    def claim(run) -> bool:
        """Hold `run` for this process; False when another one holds it or has finished it."""
        if run.name in claims:  # claimed while we waited for it
            return True
        stack, last = ExitStack(), read_holder(run.out_dir / CLAIM)  # (taking the claim overwrites it)
        try:
            stack.enter_context(run_lock(run.out_dir / CLAIM))
        except RunFolderBusy as busy:
            with lock:
                deferred.append((run, busy.holder))
            return False
        finished = _finished_status(run)
        if finished:  # since we looked, by another process (the last to claim it)
            stack.close()
            status[run.name] = elsewhere(run, finished, last)
            return False
        if is_locked(run.out_dir):  # a `train` started by hand, or a notebook orphaned by a killed `reproduce`
            stack.close()
            with lock:
                deferred.append((run, read_holder(run.out_dir)))
            return False
        (run.out_dir / "error.json").unlink(missing_ok=True)  # a previous attempt's
        claims[run.name] = stack
        return True

    def train_batch(output, batch, slot):
        batch = [r for r in batch if claim(r)]
        if not batch:
            return
        env, gpu, device = envs[slot]
        watcher = _Watcher(bar, batch)
        watcher.start()
        params = {"runs": [_notebook_config(replace(r.config, device=device)) for r in batch], "progress": False}
        try:
            notebook_error = execute(notebook, output, params, env)
        except Exception as e:  # noqa: BLE001 -- e.g. a full disk: these runs fail, the queue goes on
            notebook_error = f"{type(e).__name__}: {e}".splitlines()[0]
        watcher.stop.set()
        watcher.join()
        watcher.poll()
        for r in batch:
            row = {"notebook": str(output), "device": slots[slot], "gpu": gpu, "slot": slot}
            if (r.out_dir / "result.json").exists():
                status[r.name] = {"status": "done", "error": None} | row
            elif NOTEBOOKS_RUNNING.stopping:
                status[r.name] = {"status": "interrupted", "error": None} | row
            elif not _error_of(r) and (is_locked(r.out_dir) or notebook_error is None):
                # another process held the folder (`train` passed it over): wait for it, then see
                with lock:
                    deferred.append((r, read_holder(r.out_dir)))
                watcher.pending.remove(r)
            else:
                error = _error_of(r) or notebook_error or "the notebook ended without a result for this run"
                status[r.name] = {"status": "failed", "error": error} | row
            claims.pop(r.name).close()
        bar.update(len(watcher.pending))  # runs the notebook never reached

    def work(queue, slot, ended):
        try:
            while True:
                seq, batch = queue.take()
                if not batch:
                    return
                output = (batch[0].out_dir / TRAIN_NOTEBOOK if notebook_per == "run"
                          else out / "notebooks" / f"{prefix}-{seq:02d}.ipynb")
                train_batch(output, batch, slot)
        finally:
            ended.set()

    def wait_for_others() -> list:
        """Wait for the runs other processes held; those they left unfinished are ours now."""
        again = []
        while deferred:
            run, holder = deferred.pop(0)
            tqdm.write(f"waiting for {run.name}: {describe_holder(holder)} holds it")
            stack = ExitStack()
            stack.enter_context(run_lock(run.out_dir / CLAIM, blocking=True))
            with run_lock(run.out_dir, blocking=True):
                pass
            finished = _finished_status(run)
            if finished or _error_of(run):
                stack.close()
                finished = finished or {"status": "failed", "error": _error_of(run), "notebook": None}
                status[run.name] = elsewhere(run, finished, holder)
            else:
                claims[run.name] = stack
                again.append(run)
        return again

    # The main thread waits on events, not Thread.join(): a join that a signal interrupts
    # can leave the thread marked as ended while it still runs (CPython gh-90882; it
    # happened here on 3.11, and the running notebook's runs went unreported).
    queue, ended, todo, seq = None, [], pending, 0
    try:
        while todo:
            queue = _Queue(todo, cost, len(slots), per_run=notebook_per == "run")
            queue.taken = seq  # chunk notebooks of a later round are numbered on
            ended = [threading.Event() for _ in slots]
            for slot in range(len(slots)):
                threading.Thread(target=work, args=(queue, slot, ended[slot]), daemon=True).start()
            for e in ended:
                e.wait()
            seq = queue.taken
            todo = wait_for_others()
    except KeyboardInterrupt as stop:  # Ctrl-C or a signal (Stopped): no new notebook starts; the running ones are stopped
        if queue:
            queue.close()
        NOTEBOOKS_RUNNING.stop()
        for e in ended:
            e.wait()
        NOTEBOOKS_RUNNING.reset()
        for stack in claims.values():
            stack.close()
        for r in runs:
            status.setdefault(r.name, {"status": "pending", "error": None, "notebook": None, "device": None,
                                       "gpu": None, "slot": None})
        bar.close()
        if isinstance(stop, Stopped):
            stop.rows = _rows(runs, status)
        raise
    bar.close()
    return _rows(runs, status)


def _rows(runs, status) -> list[dict]:
    rows = []
    for r in runs:
        result = r.out_dir / "result.json"
        try:
            seconds = json.loads(result.read_text())["train_seconds"] if result.exists() else None
        except (ValueError, KeyError):
            seconds = None
        rows.append({"name": r.name, "group": r.group, "out_dir": str(r.out_dir), **status[r.name],
                     "train_seconds": seconds})
    return rows


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


# --------------------------------------------------------------------------------------
def _absolute(run):
    return replace(run, config=replace(run.config, out_dir=str(Path(run.config.out_dir).resolve())))


def reproduce(profile: str, out=None, only=None, runs=None, notebook_per: str | None = None,
              figures_dir=None, analysis: bool = True, progress: bool = True, jobs: int | None = None,
              devices=None, shard=None, report: bool = False, publish_notebooks: bool = False) -> dict:
    """Train the runs of `profile` (or the given `runs`) -- all, or part `shard` ('I/N') --
    on `devices`, run the analysis notebooks, write and return the summary;
    summary['exit_code'] is 0, or 1 if anything failed. `report`: train nothing, only the
    analysis notebooks over the finished runs.

    SIGTERM, SIGINT or SIGHUP (what SLURM, `timeout`, a preemption or Ctrl-C send) stop every
    notebook with its kernel and wait for them; the summary marks the runs that were training
    `interrupted` (and those not started `pending`), one line says so on stderr, and
    summary['exit_code'] is 128 + the signal. A rerun resumes them from their checkpoints."""
    t0, state = time.perf_counter(), {}  # state: the summary as far as it is known
    with stop_on_signals(STOP_SIGNALS):
        try:
            return _reproduce(profile, out, only, runs, notebook_per, figures_dir, analysis, progress, jobs,
                              devices, shard, report, publish_notebooks, t0, state)
        except Stopped as stop:
            NOTEBOOKS_RUNNING.stop()  # (run_all has stopped its own already: then a no-op)
            NOTEBOOKS_RUNNING.reset()
            return _stopped(stop, state, t0)


def _stopped(stop: Stopped, state: dict, t0) -> dict:
    """The summary of a `reproduce` stopped by a signal -- written once the training had
    started (`stop.rows`, or `state['rows']` when it was over) -- and its one line on stderr."""
    summary = {"exit_code": 128 + stop.signum, "signal": str(stop), **_elapsed(t0)}
    rows, where = getattr(stop, "rows", None) or state.get("rows"), ""
    if rows is not None:
        summary = {**state["summary"], **summary, "runs": rows, "notebooks": [],
                   **{key: sum(r["status"] == key for r in rows) for key in RUN_STATUSES}}
        jsonio.save(state["path"], summary)
        stopped = [r["name"] for r in rows if r["status"] == "interrupted"]
        where = f"; {len(stopped)} runs interrupted ({', '.join(stopped) or 'none'}), marked in {state['path']}"
    print(f"contsup: stopped by {stop}{where}; rerun the same command to resume (finished runs are "
          f"skipped, interrupted ones resume from their checkpoints)", file=sys.stderr, flush=True)
    return summary


RUN_STATUSES = ("done", "skipped", "elsewhere", "failed", "interrupted", "pending")


def _reproduce(profile, out, only, runs, notebook_per, figures_dir, analysis, progress, jobs, devices, shard,
               report, publish_notebooks, t0, state: dict) -> dict:
    experiments.profile_settings(profile)
    groups = experiments.check_groups(only)
    index, count = parse_shard(shard) if shard is not None else (1, 1)
    if report and count > 1:
        raise UsageError("--report works on every finished run; drop --shard")
    slots = parse_devices(devices, profile, jobs)
    notebook_per = notebook_per or ("run" if profile == "paper" else "chunk")
    if notebook_per not in ("run", "chunk"):
        raise UsageError(f"unknown --notebook-per '{notebook_per}'; choose run or chunk")
    # Absolute once, here: nothing below depends on the working directory.
    out = Path(out or f"results/{profile}").resolve()
    figures = Path(figures_dir or DEFAULT_FIGURES.get(profile, out / "figures")).resolve()
    if runs is None:
        runs = experiments.expand_all(profile, out, only)
        registry = experiments.runs_by_group(profile, out, only)
    else:
        registry = {}
        for r in runs:
            registry.setdefault(r.group, []).append(r)
        groups = list(registry)
    runs = [_absolute(r) for r in runs]
    registry = {g: [_absolute(r) for r in rs] for g, rs in registry.items()}
    check_writable_folder(out, "--out")
    if analysis or report:
        check_writable_folder(figures, "--figures-dir")
    if report:
        return _report(profile, out, groups, runs, registry, figures, t0)

    todo = [r for r in runs if not (r.out_dir / "result.json").exists()]
    cost = run_costs(runs if count > 1 else todo, profile, progress)
    mine = shard_runs(runs, index, count, cost) if count > 1 else runs
    out.mkdir(parents=True, exist_ok=True)
    part = f" (shard {index}/{count} of {len(runs)})" if count > 1 else ""
    print(f"reproduce --profile {profile}: {len(mine)} runs{part} in {out}/runs (groups: {', '.join(groups)}; "
          f"one notebook per {notebook_per}; {len(slots)} at a time on {', '.join(dict.fromkeys(slots))})",
          flush=True)

    prefix = "02_train" if count == 1 else f"02_train-shard{index}of{count}"
    state.update(path=out / ("summary.json" if count == 1 else f"summary-shard{index}of{count}.json"),
                  summary={"profile": profile, "out": str(out), "groups": groups, "shard": f"{index}/{count}",
                           "notebook_per": notebook_per, "devices": slots, "jobs": len(slots),
                           "runs_total": len(mine), "registry": _registry_json(registry)})
    statuses = state["rows"] = run_all(mine, out, notebook_per, progress, slots, cost, prefix)

    notebooks = []
    if analysis and count == 1:
        names = (["01_information_motivation.ipynb"] if "motivation" in groups else []) + \
                ["03_tables.ipynb", "04_figures.ipynb"]
        notebooks = run_notebooks(names, out, profile, figures)
        if publish_notebooks:
            env = kernel_environment()
            publish.publish(out / "notebooks", NOTEBOOKS, lambda src, dst, params: execute(src, dst, params, env))
    elif analysis:
        print(f"note: shard {index}/{count} leaves the tables and figures to "
              f"`python -m contsup reproduce --profile {profile} --out {out} --report` once every shard is done")

    failed = [s for s in statuses if s["status"] == "failed"] + [n for n in notebooks if n["status"] == "failed"]
    summary = {
        **state["summary"], **{key: sum(s["status"] == key for s in statuses) for key in RUN_STATUSES},
        "notebooks": notebooks, **_elapsed(t0),
        "exit_code": 1 if failed else 0, "runs": statuses,
    }
    path = state["path"]  # (state["summary"]["registry"]: which run folder each group's entries use)
    jsonio.save(path, summary)
    _print_summary(summary, path)
    return summary


def _registry_json(registry) -> dict:
    return {g: [{"name": r.name, "paper_dataset": r.paper_dataset, "paper_arch": r.paper_arch,
                 "config": _config_json(r.config)} for r in rs] for g, rs in registry.items()}


def _report(profile, out: Path, groups, runs, registry, figures: Path, t0) -> dict:
    """`--report`: the analysis notebooks over the finished runs; trains nothing."""
    statuses = []
    for r in runs:
        s = _finished_status(r) or {"status": "failed" if _error_of(r) else "missing", "error": _error_of(r),
                                    "notebook": None}
        statuses.append({"name": r.name, "group": r.group, "out_dir": str(r.out_dir),
                         **s, "status": "done" if s["status"] == "skipped" else s["status"]})
    done = {s["name"] for s in statuses if s["status"] == "done"}
    if not done:  # the notebooks would train a demo set instead
        raise UsageError(f"no finished runs in {out / 'runs'} to report on; train them first with "
                         f"`python -m contsup reproduce --profile {profile} --out {out}` (or --shard I/N)")
    names = ["03_tables.ipynb", "04_figures.ipynb"]
    if "motivation" in groups:
        if all(r.name in done for r in registry.get("motivation", [])):
            names.insert(0, "01_information_motivation.ipynb")
        else:
            print("note: the motivation runs are not all finished; notebook 01 skipped")
    print(f"reproduce --report --profile {profile}: {len(done)} of {len(runs)} runs finished in {out / 'runs'}",
          flush=True)
    notebooks = run_notebooks(names, out, profile, figures)
    count_of = lambda key: sum(s["status"] == key for s in statuses)  # noqa: E731
    summary = {
        "profile": profile, "out": str(out), "groups": groups, "report": True,
        "runs_total": len(statuses), "done": count_of("done"), "missing": count_of("missing"),
        "failed": count_of("failed"), "notebooks": notebooks, **_elapsed(t0),
        "exit_code": 1 if any(n["status"] == "failed" for n in notebooks) else 0, "runs": statuses,
        "registry": _registry_json(registry),
    }
    jsonio.save(out / "summary.json", summary)
    for n in notebooks:
        if n["status"] != "missing":
            print(f"  {n['notebook']}: {n['status']} ({n['output']})" + (f": {n['error']}" if n["error"] else ""))
    for key in ("missing", "failed"):
        names = [s["name"] + (f": {s['error']}" if s["error"] else "") for s in statuses if s["status"] == key]
        if names:
            print(f"{len(names)} runs {key}:", *names, sep="\n  ")
    print(f"Summary: {out / 'summary.json'}")
    return summary


def _elapsed(t0) -> dict:
    """How long `reproduce` took since `t0`: wall seconds, and CPU seconds of this process and
    of its children that ended (the notebook processes, each having waited for its kernel)."""
    cpu = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))
    return {"wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu, 1)}


def _print_summary(s: dict, path: Path) -> None:
    minutes = s["wall_seconds"] / 60
    others = f"{s['elsewhere']} trained by another process meanwhile, " if s["elsewhere"] else ""
    print(f"\n{s['runs_total']} runs: {s['done']} done, {s['skipped']} skipped (already finished), {others}"
          f"{s['failed']} failed; {minutes:.1f} min ({s['cpu_seconds'] / 60:.1f} min of CPU). Summary: {path}")
    for n in s["notebooks"]:
        if n["status"] != "missing":
            print(f"  {n['notebook']}: {n['status']} ({n['output']})")
    failures = [r for r in s["runs"] if r["status"] == "failed"] + \
               [dict(name=n["notebook"], error=n["error"], notebook=n["output"])
                for n in s["notebooks"] if n["status"] == "failed"]
    if failures:
        print("failed:")
        for f in failures:
            print(f"  {f['name']}: {f['error']}\n      notebook: {f['notebook']}")


def main(args) -> int:
    try:
        summary = reproduce(args.profile, args.out, args.only, notebook_per=args.notebook_per,
                            figures_dir=args.figures_dir, progress=not args.no_progress, jobs=args.jobs,
                            devices=args.devices, shard=args.shard, report=args.report,
                            publish_notebooks=args.publish_notebooks)
    except KeyboardInterrupt:  # (only outside the main thread: there, SIGINT stops `reproduce` as SIGTERM does)
        print("contsup: interrupted; rerun the same command to continue (finished runs are skipped, "
              "an interrupted one resumes from its checkpoint)", file=sys.stderr)
        return 130
    return summary["exit_code"]
