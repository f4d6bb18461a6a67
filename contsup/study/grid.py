"""Training a grid of runs through `notebooks/02_train.ipynb`, from one queue, on slots.

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
  1..N, N..1, 1..N, ..., so the parts are balanced and the same on every machine.

A finished run (result.json present) is skipped; an interrupted one resumes from its
checkpoint. Other `reproduce`s on the same folder share the work run by run (`Grid`:
claims): each run is trained once, a run another process holds is waited for and listed
as `elsewhere`. A failing run does not stop the others (nor the other slots' queue): it
writes `<run>/error.json` and is listed with its one-line error and notebook.
"""
from __future__ import annotations

import json
import os
import re
import threading
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import data, tables
from ..errors import Stopped, UsageError, check_writable_folder
from ..model import parse_mode
from ..runlock import RunFolderBusy, describe_holder, is_locked, read_holder, run_lock
from ..rundir import config_json as _config_json, config_diff, read_run_json
from ..train import TrainConfig
from . import estimate, kernels
from .kernels import NOTEBOOKS_RUNNING

NOTEBOOK_PER = ("run", "chunk")


def check_notebook_per(notebook_per: str) -> None:
    if notebook_per not in NOTEBOOK_PER:
        raise UsageError(f"unknown --notebook-per '{notebook_per}'; choose run or chunk")


def notebook_config(cfg: TrainConfig) -> dict:
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


def error_of(run) -> str | None:
    path = run.out_dir / "error.json"
    return json.loads(path.read_text())["error"] if path.exists() else None


def finished_status(run) -> dict | None:
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
        done = [r for r in self.pending if (r.out_dir / "result.json").exists() or error_of(r)]
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


class RunQueue:
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


CLAIM = ".reproduce"  # <run>/.reproduce/.lock: held by the `reproduce` whose notebook trains the run


def slot_environment(device: str, threads: int | None) -> tuple[dict, int | str | None, str]:
    """(environment, GPU, device name inside) of a notebook process of the slot `device`. A
    GPU slot's process sees only its GPU (CUDA_VISIBLE_DEVICES), which it calls `cuda`: no
    CUDA context of it lands on another GPU (cuda:0 above all). The GPU is named as
    CUDA_VISIBLE_DEVICES names it: its physical index, or the entry of our own
    CUDA_VISIBLE_DEVICES when that is set (under SLURM, cuda:0 may be GPU 2)."""
    env = kernels.kernel_environment(threads)
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


class Grid:
    """One training of a grid of runs (`run_all`), in named steps: `sort_out` (finished runs
    are skipped), `prepare` (kernel, data, costs, the slots' environments), then rounds of
    `train_queue` -- each slot `work`s through the queue: `claim` the runs of a notebook,
    `train_batch`, `record` each run's outcome -- and `wait_for_others` (the runs other
    processes held), until nothing is left; `stop` on a stop signal."""

    def __init__(self, out, notebook_per: str = "run", slots=("cpu",), prefix: str = "02_train"):
        check_notebook_per(notebook_per)
        self.slots, self.out = list(slots), Path(out).resolve()
        self.notebook_per, self.prefix = notebook_per, prefix
        self.status = {}  # run name -> its status row
        self.claims, self.deferred = {}, []  # run name -> its claim (an ExitStack); (run, holder) passed over
        self.lock = threading.Lock()
        self.queue, self.ended, self.bar = None, [], None
        self.cost, self.notebook, self.envs = {}, None, []  # set by `prepare`

    def run(self, runs, cost: dict | None = None, progress: bool = True) -> list[dict]:
        pending = self.prepare(self.sort_out(runs), cost)
        self.bar = tqdm(total=len(pending), desc="runs", unit="run", disable=not progress or not pending)
        try:
            self.train_queue(pending)
        except KeyboardInterrupt as stop:  # Ctrl-C or a signal (Stopped)
            self.stop(runs, stop)
            raise
        self.bar.close()
        return status_rows(runs, self.status)

    def sort_out(self, runs) -> list:
        """The runs still to train; the finished ones get their status now."""
        pending = []
        for run in runs:
            finished = finished_status(run)
            if finished:
                self.status[run.name] = {**finished, "device": None, "gpu": None, "slot": None}
            else:
                pending.append(run)
        return pending

    def prepare(self, pending, cost: dict | None) -> list:
        """Check the kernel, download the data, cost the runs (given `cost`, else the proxy)
        and set up each slot's environment; returns the pending runs, downloading nothing."""
        if pending:
            kernels.check_kernel()
        pending = prefetch_data(pending)
        given = cost or {}
        self.cost = {r.name: given[r.name] if r.name in given else run_cost(r.config, "quick") for r in pending}
        self.notebook = kernels.NOTEBOOKS / kernels.TRAIN_NOTEBOOK
        threads = max(1, (os.cpu_count() or 1) // len(self.slots)) if len(self.slots) > 1 else None
        self.envs = [slot_environment(device, threads) for device in self.slots]
        return pending

    def train_queue(self, todo) -> None:
        """Rounds of: every slot works through one queue of `todo`; then the runs that other
        processes held and left unfinished are the next round's. The main thread waits on
        events, not Thread.join(): a join that a signal interrupts can leave the thread marked
        as ended while it still runs (CPython gh-90882; it happened here on 3.11, and the
        running notebook's runs went unreported)."""
        seq = 0
        while todo:
            self.queue = RunQueue(todo, self.cost, len(self.slots), per_run=self.notebook_per == "run")
            self.queue.taken = seq  # chunk notebooks of a later round are numbered on
            self.ended = [threading.Event() for _ in self.slots]
            for slot in range(len(self.slots)):
                threading.Thread(target=self.work, args=(self.queue, slot, self.ended[slot]), daemon=True).start()
            for e in self.ended:
                e.wait()
            seq = self.queue.taken
            todo = self.wait_for_others()

    def work(self, queue, slot: int, ended) -> None:
        """One slot's thread: notebooks from the head of `queue` until it is empty."""
        try:
            while True:
                seq, batch = queue.take()
                if not batch:
                    return
                output = (batch[0].out_dir / kernels.TRAIN_NOTEBOOK if self.notebook_per == "run"
                          else self.out / "notebooks" / f"{self.prefix}-{seq:02d}.ipynb")
                self.train_batch(output, batch, slot)
        finally:
            ended.set()

    def elsewhere(self, run, finished, holder) -> dict:
        """The status of a run another process finished (or failed) while we ran."""
        self.bar.update(1)
        row = {**finished, "device": None, "gpu": None, "slot": None, "trained_by": describe_holder(holder)}
        return row | ({"status": "elsewhere"} if finished["status"] == "skipped" else {})

    def claim(self, run) -> bool:
        """Hold `run` for this process; False when another one holds it or has finished it."""
        if run.name in self.claims:  # claimed while we waited for it
            return True
        stack, last = ExitStack(), read_holder(run.out_dir / CLAIM)  # (taking the claim overwrites it)
        try:
            stack.enter_context(run_lock(run.out_dir / CLAIM))
        except RunFolderBusy as busy:
            with self.lock:
                self.deferred.append((run, busy.holder))
            return False
        finished = finished_status(run)
        if finished:  # since we looked, by another process (the last to claim it)
            stack.close()
            self.status[run.name] = self.elsewhere(run, finished, last)
            return False
        if is_locked(run.out_dir):  # a `train` started by hand, or a notebook orphaned by a killed `reproduce`
            stack.close()
            with self.lock:
                self.deferred.append((run, read_holder(run.out_dir)))
            return False
        (run.out_dir / "error.json").unlink(missing_ok=True)  # a previous attempt's
        self.claims[run.name] = stack
        return True

    def train_batch(self, output: Path, batch, slot: int) -> None:
        """Train the runs of `batch` we can claim in one notebook, saved as `output`, on `slot`."""
        batch = [r for r in batch if self.claim(r)]
        if not batch:
            return
        env, gpu, device = self.envs[slot]
        watcher = _Watcher(self.bar, batch)
        watcher.start()
        params = {"runs": [notebook_config(replace(r.config, device=device)) for r in batch], "progress": False}
        try:
            notebook_error = kernels.execute(self.notebook, output, params, env)
        except Exception as e:  # noqa: BLE001 -- e.g. a full disk: these runs fail, the queue goes on
            notebook_error = f"{type(e).__name__}: {e}".splitlines()[0]
        watcher.stop.set()
        watcher.join()
        watcher.poll()
        row = {"notebook": str(output), "device": self.slots[slot], "gpu": gpu, "slot": slot}
        for r in batch:
            self.record(r, row, notebook_error, watcher)
        self.bar.update(len(watcher.pending))  # runs the notebook never reached

    def record(self, r, row: dict, notebook_error: str | None, watcher) -> None:
        """The outcome of run `r` once its notebook has ended; its claim is let go."""
        if (r.out_dir / "result.json").exists():
            self.status[r.name] = {"status": "done", "error": None} | row
        elif NOTEBOOKS_RUNNING.stopping:
            self.status[r.name] = {"status": "interrupted", "error": None} | row
        elif not error_of(r) and (is_locked(r.out_dir) or notebook_error is None):
            # another process held the folder (`train` passed it over): wait for it, then see
            with self.lock:
                self.deferred.append((r, read_holder(r.out_dir)))
            watcher.pending.remove(r)
        else:
            error = error_of(r) or notebook_error or "the notebook ended without a result for this run"
            self.status[r.name] = {"status": "failed", "error": error} | row
        self.claims.pop(r.name).close()

    def wait_for_others(self) -> list:
        """Wait for the runs other processes held; those they left unfinished are ours now."""
        again = []
        while self.deferred:
            run, holder = self.deferred.pop(0)
            tqdm.write(f"waiting for {run.name}: {describe_holder(holder)} holds it")
            stack = ExitStack()
            stack.enter_context(run_lock(run.out_dir / CLAIM, blocking=True))
            with run_lock(run.out_dir, blocking=True):
                pass
            finished = finished_status(run)
            if finished or error_of(run):
                stack.close()
                finished = finished or {"status": "failed", "error": error_of(run), "notebook": None}
                self.status[run.name] = self.elsewhere(run, finished, holder)
            else:
                self.claims[run.name] = stack
                again.append(run)
        return again

    def stop(self, runs, stop: KeyboardInterrupt) -> None:
        """On Ctrl-C or a signal: no new notebook starts, the running ones are stopped, the
        claims let go; runs not started are `pending`, and a `Stopped` carries the rows."""
        if self.queue:
            self.queue.close()
        NOTEBOOKS_RUNNING.stop()
        for e in self.ended:
            e.wait()
        NOTEBOOKS_RUNNING.reset()
        for stack in self.claims.values():
            stack.close()
        for r in runs:
            self.status.setdefault(r.name, {"status": "pending", "error": None, "notebook": None, "device": None,
                                            "gpu": None, "slot": None})
        self.bar.close()
        if isinstance(stop, Stopped):
            stop.rows = status_rows(runs, self.status)


def run_all(runs, out, notebook_per: str = "run", progress: bool = True, *, slots=("cpu",),
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
    return Grid(out, notebook_per, slots, prefix).run(runs, cost, progress)


def status_rows(runs, status: dict) -> list[dict]:
    """One row per run: its status, and how long it trained where it has a result."""
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
