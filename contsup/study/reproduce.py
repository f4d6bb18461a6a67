"""`python -m contsup reproduce`: train every run of a profile, then build tables and figures.

    python -m contsup reproduce --profile quick|paper|smoke [--only GROUP ...] [--out DIR]
                                [--devices auto|cpu|cuda:0,cuda:1,...] [--jobs N] [--shard I/N]
    python -m contsup reproduce --profile ... --report

Each run is trained by executing `notebooks/02_train.ipynb` with papermill and lands in
its own folder `<out>/runs/<name>/` (config.json, metrics.jsonl, ckpt.pt, result.json).
How the grid is executed -- slots, the queue, chunks, shards, claims -- is told in `grid`;
how a notebook runs in a process of its own and is stopped, in `kernels`.

`--shard I/N` trains a fixed 1/N of the runs (`grid.shard_runs`): N machines sharing one
results folder (a SLURM job array, README "Many GPUs") thus split the grid with no
coordinator. A sharded run writes `<out>/summary-shard<I>of<N>.json` and leaves the tables
and figures to `--report`, which trains nothing: it executes the analysis notebooks over
whatever runs are finished and lists the missing ones.

SIGTERM, SIGINT and SIGHUP stop every notebook's whole process tree, mark the running runs
`interrupted` and exit 128 + the signal. A failing run does not stop the others: it is
listed at the end with its one-line error and notebook, and the exit status becomes 1.
Then notebooks 01 (only with the `motivation` group; under `--report` only when its runs
are finished), 03 and 04 are executed with `results_dir`, `profile`, `figures_dir`; their
executed copies go to `<out>/notebooks/`. `<out>/summary.json` records every run's status
and slot and which runs each group uses.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import jsonio
from ..errors import Stopped, UsageError, check_writable_folder, stop_on_signals
from ..rundir import config_json as _config_json
from . import experiments, kernels, publish
from .grid import (check_notebook_per, error_of, finished_status, parse_devices, parse_shard, run_all, run_costs,
                   shard_runs)
from .kernels import NOTEBOOKS_RUNNING, STOP_SIGNALS

DEFAULT_FIGURES = {"quick": "figures", "paper": "figures/paper"}  # smoke: <out>/figures
RUN_STATUSES = ("done", "skipped", "elsewhere", "failed", "interrupted", "pending")


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
@dataclass(frozen=True)
class Request:
    """What one `reproduce` is asked to do: its arguments, as given (see `reproduce`)."""
    profile: str
    out: str | Path | None = None
    only: list | None = None
    runs: list | None = None
    notebook_per: str | None = None
    figures_dir: str | Path | None = None
    analysis: bool = True
    progress: bool = True
    jobs: int | None = None
    devices: str | list | None = None
    shard: str | None = None
    report: bool = False
    publish_notebooks: bool = False


@dataclass(frozen=True)
class Plan:
    """A checked `Request`: the runs, groups and slots, and every path absolute, once, so that
    nothing below depends on the working directory."""
    request: Request
    out: Path
    figures: Path
    groups: list
    runs: list
    registry: dict
    slots: list
    notebook_per: str
    index: int = 1
    count: int = 1


def _absolute(run):
    return replace(run, config=replace(run.config, out_dir=str(Path(run.config.out_dir).resolve())))


def reproduce(profile: str, out=None, only=None, runs=None, *, notebook_per: str | None = None,
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
    request = Request(profile, out, only, runs, notebook_per=notebook_per, figures_dir=figures_dir,
                      analysis=analysis, progress=progress, jobs=jobs, devices=devices, shard=shard, report=report,
                      publish_notebooks=publish_notebooks)
    t0, state = time.perf_counter(), {}  # state: the summary as far as it is known
    with stop_on_signals(STOP_SIGNALS):
        try:
            return _reproduce(request, t0, state)
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


def _plan(request: Request) -> Plan:
    """Check the request (bad input: a UsageError before anything is written) and resolve it."""
    profile = request.profile
    experiments.profile_settings(profile)
    groups = experiments.check_groups(request.only)
    index, count = parse_shard(request.shard) if request.shard is not None else (1, 1)
    if request.report and count > 1:
        raise UsageError("--report works on every finished run; drop --shard")
    slots = parse_devices(request.devices, profile, request.jobs)
    notebook_per = request.notebook_per or ("run" if profile == "paper" else "chunk")
    check_notebook_per(notebook_per)
    out = Path(request.out or f"results/{profile}").resolve()
    figures = Path(request.figures_dir or DEFAULT_FIGURES.get(profile, out / "figures")).resolve()
    if request.runs is None:
        runs = experiments.expand_all(profile, out, request.only)
        registry = experiments.runs_by_group(profile, out, request.only)
    else:
        runs, registry = request.runs, {}
        for r in runs:
            registry.setdefault(r.group, []).append(r)
        groups = list(registry)
    runs = [_absolute(r) for r in runs]
    registry = {g: [_absolute(r) for r in rs] for g, rs in registry.items()}
    check_writable_folder(out, "--out")
    if request.analysis or request.report:
        check_writable_folder(figures, "--figures-dir")
    return Plan(request, out, figures, groups, runs, registry, slots, notebook_per, index, count)


def _reproduce(request: Request, t0, state: dict) -> dict:
    plan = _plan(request)
    if request.report:
        return _report(plan, t0)
    statuses = state["rows"] = _train(plan, state)
    notebooks = _analyse(plan)
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


def _train(plan: Plan, state: dict) -> list[dict]:
    """Train this machine's runs (all, or its shard); `state` holds the summary so far."""
    profile, out, runs, slots, index, count = plan.request.profile, plan.out, plan.runs, plan.slots, plan.index, \
        plan.count
    todo = [r for r in runs if not (r.out_dir / "result.json").exists()]
    cost = run_costs(runs if count > 1 else todo, profile, plan.request.progress)
    mine = shard_runs(runs, index, count, cost) if count > 1 else runs
    out.mkdir(parents=True, exist_ok=True)
    part = f" (shard {index}/{count} of {len(runs)})" if count > 1 else ""
    print(f"reproduce --profile {profile}: {len(mine)} runs{part} in {out}/runs (groups: {', '.join(plan.groups)}; "
          f"one notebook per {plan.notebook_per}; {len(slots)} at a time on {', '.join(dict.fromkeys(slots))})",
          flush=True)

    prefix = "02_train" if count == 1 else f"02_train-shard{index}of{count}"
    state.update(path=out / ("summary.json" if count == 1 else f"summary-shard{index}of{count}.json"),
                 summary={"profile": profile, "out": str(out), "groups": plan.groups, "shard": f"{index}/{count}",
                          "notebook_per": plan.notebook_per, "devices": slots, "jobs": len(slots),
                          "runs_total": len(mine), "registry": _registry_json(plan.registry)})
    return run_all(mine, out, plan.notebook_per, plan.request.progress, slots=slots, cost=cost, prefix=prefix)


def _analyse(plan: Plan) -> list[dict]:
    """The analysis notebooks (none for a shard: `--report` runs them once all are done)."""
    request, out = plan.request, plan.out
    if not request.analysis:
        return []
    if plan.count > 1:
        print(f"note: shard {plan.index}/{plan.count} leaves the tables and figures to "
              f"`python -m contsup reproduce --profile {request.profile} --out {out} --report` once every shard "
              f"is done")
        return []
    names = (["01_information_motivation.ipynb"] if "motivation" in plan.groups else []) + \
            ["03_tables.ipynb", "04_figures.ipynb"]
    notebooks = kernels.run_notebooks(names, out, request.profile, plan.figures)
    if request.publish_notebooks:
        env = kernels.kernel_environment()
        publish.publish(out / "notebooks", kernels.NOTEBOOKS,
                        lambda src, dst, params: kernels.execute(src, dst, params, env))
    return notebooks


def _registry_json(registry) -> dict:
    return {g: [{"name": r.name, "paper_dataset": r.paper_dataset, "paper_arch": r.paper_arch,
                 "config": _config_json(r.config)} for r in rs] for g, rs in registry.items()}


def _report(plan: Plan, t0) -> dict:
    """`--report`: the analysis notebooks over the finished runs; trains nothing."""
    profile, out, groups, runs, registry = plan.request.profile, plan.out, plan.groups, plan.runs, plan.registry
    statuses = []
    for r in runs:
        s = finished_status(r) or {"status": "failed" if error_of(r) else "missing", "error": error_of(r),
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
    notebooks = kernels.run_notebooks(names, out, profile, plan.figures)
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
