"""`python -m contsup reproduce`: train every run of a profile, then build tables and figures.

    python -m contsup reproduce --profile quick|paper|smoke [--only GROUP ...] [--out DIR]

Each run is trained by executing `notebooks/02_train.ipynb` with papermill and lands in
its own folder `<out>/runs/<name>/` (config.json, metrics.jsonl, ckpt.pt, result.json).
A papermill kernel costs about 3 s to start on a 2-core CPU, so:

- `paper` executes one notebook per run, saved as `<out>/runs/<name>/02_train.ipynb`
  (3 s are nothing next to 160 GPU epochs);
- `quick` and `smoke` execute one notebook per *group*, handed the group's run configs,
  saved as `<out>/notebooks/02_train-<group>.ipynb` (87 quick runs x 3 s would eat a third
  of the 15-minute budget). `--notebook-per run|group` overrides either default.

A finished run (result.json present) is skipped; an interrupted one resumes from its
checkpoint. A failing run does not stop the others: it writes `<run>/error.json`, is
listed at the end with its one-line error and notebook, and the exit status becomes 1.
Then notebooks 01 (only with the `motivation` group), 03 and 04 are executed with
`results_dir`, `profile`, `figures_dir`; their executed copies go to `<out>/notebooks/`.
`<out>/summary.json` records every run's status and which runs each group uses.

The second half of this file holds the small helpers `02_train.ipynb` calls.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from .. import jsonio
from ..errors import UsageError, check_writable_folder
from ..train import TrainConfig, _config_json, config_diff, read_run_json
from . import experiments

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
    p.add_argument("--notebook-per", choices=("run", "group"), default=None,
                   help="one 02_train notebook per run or per group (default: run for paper, else group)")
    p.add_argument("--jobs", type=int, default=None,
                   help="notebooks trained side by side, each with cores/jobs threads (default: 2 for "
                        "quick and smoke on a CPU with 2+ cores, else 1; one GPU: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------
# Executing notebooks
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


@contextmanager
def _kernel_environment(threads: int | None = None):
    """What the papermill kernels inherit: this very copy of contsup on PYTHONPATH (installed
    or not), and OpenMP threads that sleep instead of spinning while they wait. On a shared
    2-core machine, spinning torch threads of two busy processes slowed a training step
    ~80x (10 vs 840 images/s, ResNet-32 on 8x8 digits); OMP_WAIT_POLICY=PASSIVE avoids it.
    With `threads`, each kernel gets that many OpenMP threads (parallel jobs share the cores).
    A value the user has set is kept."""
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    path = [str(PACKAGE_PARENT)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else [])
    os.environ["PYTHONPATH"] = os.pathsep.join(path)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(notebook: Path, output: Path, parameters: dict) -> str | None:
    """Run a notebook with papermill; None on success, else the one-line error."""
    import papermill
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name=KERNEL,
                                   progress_bar=False, log_output=False, cwd=str(notebook.parent))
    except papermill.PapermillExecutionError as e:
        return f"{e.ename}: {e.evalue}".splitlines()[0] if e.evalue else e.ename
    except Exception as e:  # kernel died, notebook unreadable...: still one line per run
        return f"{type(e).__name__}: {e}".splitlines()[0]
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


class _Watcher(threading.Thread):
    """Advances the progress bar as runs inside a group notebook finish."""

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


def default_jobs(profile: str) -> int:
    """Two notebooks side by side on a CPU of 2+ cores for the small profiles: their steps are
    too small to keep two threads busy (measured: see experiments.py); one otherwise."""
    import torch
    small = profile in ("quick", "smoke") and not torch.cuda.is_available()
    return 2 if small and (os.cpu_count() or 1) >= 2 else 1


def check_jobs(jobs) -> None:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"--jobs must be a positive integer, got {jobs}")


def run_all(runs, out, notebook_per: str = "run", progress: bool = True, jobs: int = 1) -> list[dict]:
    """Train `runs` (a list of experiments.Run) through 02_train.ipynb, `jobs` notebooks at
    a time; one status dict per run: name, group, status (done | skipped | failed), error,
    notebook, out_dir."""
    if notebook_per not in ("run", "group"):
        raise UsageError(f"unknown --notebook-per '{notebook_per}'; choose run or group")
    check_jobs(jobs)
    out = Path(out)
    status, pending = {}, []
    for run in runs:
        if (run.out_dir / "result.json").exists():
            stale = _stale_keys(run)
            error = (f"{run.out_dir} holds a finished run of another config (differs in {stale}); "
                     f"move it away or use another --out") if stale else None
            status[run.name] = {"status": "failed" if stale else "skipped", "error": error, "notebook": None}
        else:
            (run.out_dir / "error.json").unlink(missing_ok=True)  # a previous attempt's
            pending.append(run)
    if pending:
        check_kernel()
    notebook = NOTEBOOKS / TRAIN_NOTEBOOK
    if notebook_per == "run":
        batches = [(run.out_dir / TRAIN_NOTEBOOK, [run]) for run in pending]
    else:  # with jobs > 1 each group is dealt round-robin into `jobs` notebooks of similar cost
        groups = dict.fromkeys(r.group for r in pending)
        batches = []
        for g in groups:
            mine = [r for r in pending if r.group == g]
            shards = min(jobs, len(mine))
            batches += [(out / "notebooks" / (f"02_train-{g}.ipynb" if shards == 1 else f"02_train-{g}-{i + 1}.ipynb"),
                         mine[i::shards]) for i in range(shards)]

    bar = tqdm(total=len(pending), desc="runs", unit="run", disable=not progress or not pending)

    def train_batch(output, batch):
        watcher = _Watcher(bar, batch)
        watcher.start()
        params = {"runs": [_notebook_config(r.config) for r in batch], "progress": False}
        for r in batch:
            r.out_dir.mkdir(parents=True, exist_ok=True)
        notebook_error = execute(notebook, output, params)
        watcher.stop.set()
        watcher.join()
        watcher.poll()
        bar.update(len(watcher.pending))  # runs the notebook never reached
        for r in batch:
            if (r.out_dir / "result.json").exists():
                status[r.name] = {"status": "done", "error": None, "notebook": str(output)}
            else:
                error = _error_of(r) or notebook_error or "the notebook ended without a result for this run"
                status[r.name] = {"status": "failed", "error": error, "notebook": str(output)}

    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    with _kernel_environment(threads), ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(train_batch, output, batch) for output, batch in batches]:
            future.result()
    bar.close()
    rows = []
    for r in runs:
        result = r.out_dir / "result.json"
        seconds = json.loads(result.read_text())["train_seconds"] if result.exists() else None
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
        with _kernel_environment():
            error = execute(src, output, params)
        results.append({"notebook": name, "status": "failed" if error else "done", "error": error,
                        "output": str(output), "seconds": round(time.perf_counter() - t0, 1)})
    return results


# --------------------------------------------------------------------------------------
def reproduce(profile: str, out=None, only=None, runs=None, notebook_per: str | None = None,
              figures_dir=None, analysis: bool = True, progress: bool = True, jobs: int | None = None) -> dict:
    """Train the runs of `profile` (or the given `runs`), run the analysis notebooks, write
    and return the summary; summary['exit_code'] is 0, or 1 if anything failed."""
    t0 = time.perf_counter()
    experiments.profile_settings(profile)
    out = Path(out or f"results/{profile}")
    groups = experiments.check_groups(only)
    if runs is None:
        runs = experiments.expand_all(profile, out, only)
        registry = experiments.runs_by_group(profile, out, only)
    else:
        registry = {}
        for r in runs:
            registry.setdefault(r.group, []).append(r)
        groups = list(registry)
    notebook_per = notebook_per or ("run" if profile == "paper" else "group")
    jobs = default_jobs(profile) if jobs is None else jobs
    check_jobs(jobs)
    figures = Path(figures_dir or DEFAULT_FIGURES.get(profile, out / "figures"))
    check_writable_folder(out, "--out")
    if analysis:
        check_writable_folder(figures, "--figures-dir")
    out.mkdir(parents=True, exist_ok=True)
    print(f"reproduce --profile {profile}: {len(runs)} runs in {out}/runs "
          f"(groups: {', '.join(groups)}; one notebook per {notebook_per}; {jobs} at a time)", flush=True)

    statuses = run_all(runs, out, notebook_per, progress, jobs)

    notebooks = []
    if analysis:
        names = (["01_information_motivation.ipynb"] if "motivation" in groups else []) + \
                ["03_tables.ipynb", "04_figures.ipynb"]
        notebooks = run_notebooks(names, out, profile, figures)

    count = lambda key: sum(s["status"] == key for s in statuses)  # noqa: E731
    failed = [s for s in statuses if s["status"] == "failed"] + [n for n in notebooks if n["status"] == "failed"]
    summary = {
        "profile": profile, "out": str(out), "groups": groups, "notebook_per": notebook_per, "jobs": jobs,
        "runs_total": len(statuses), "done": count("done"), "skipped": count("skipped"), "failed": count("failed"),
        "notebooks": notebooks, "wall_seconds": round(time.perf_counter() - t0, 1),
        "exit_code": 1 if failed else 0, "runs": statuses,
        # which run folder each group's entries use, with the paper's dataset/arch they stand for
        "registry": {g: [{"name": r.name, "paper_dataset": r.paper_dataset, "paper_arch": r.paper_arch,
                          "config": _config_json(r.config)} for r in rs] for g, rs in registry.items()},
    }
    (out / "summary.json").write_text(jsonio.dumps(summary, indent=2))
    _print_summary(summary, out)
    return summary


def _print_summary(s: dict, out: Path) -> None:
    minutes = s["wall_seconds"] / 60
    print(f"\n{s['runs_total']} runs: {s['done']} done, {s['skipped']} skipped (already finished), "
          f"{s['failed']} failed; {minutes:.1f} min. Summary: {out / 'summary.json'}")
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
                            figures_dir=args.figures_dir, progress=not args.no_progress, jobs=args.jobs)
    except KeyboardInterrupt:
        print("contsup: interrupted; rerun the same command to continue (finished runs are skipped, "
              "an interrupted one resumes from its checkpoint)", file=sys.stderr)
        return 130
    return summary["exit_code"]
