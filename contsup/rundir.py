"""A run's folder: its files, what they must hold, and how they are written and read.

A run (one `train.TrainConfig`) lives in its folder `cfg.out_dir`: `config.json`,
`metrics.jsonl` (one line per epoch), `ckpt.pt` (everything resume needs, written atomically
every epoch, and the metrics rows: a resume restores a lost or damaged line) and, once
finished, `result.json` (with the facts that made it: provenance.run_facts); a run stopped
by a non-finite loss leaves `error.json` instead. All JSON is strict (jsonio): no NaN/Infinity literals.

One writer per run folder: `open_run` takes the folder's lock (runlock.run_lock) before it
reads the folder, into the caller's ExitStack, which holds it until result.json is written;
any exit releases it, and a second writer is refused in one line naming the holder. A
finished run resumed is only read: no lock, nothing written (a read-only folder will do).
Every file is written whole (jsonio.write_atomic, jsonio.append_line): a full disk, a
file-size limit or a signal leaves the previous checkpoint and no .tmp. Every file read back
is checked field by field (`check_fields`): a damaged or hand-edited one is named in one line
with its field.

The lock itself (flock, its holder stamp) is runlock's: a small OS-level protocol of its own,
also used by the study's scheduler. `cfg` below is a run's config (train.TrainConfig), read
field by field: this module is below the trainer and never imports it.
"""
from __future__ import annotations

import io
import json
import math
import numbers
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import jsonio
from .errors import UsageError, check_writable_folder
from .provenance import facts_by_part, result_facts
from .runlock import run_lock
from .speed.setup import pick_device


def atomic_save(obj, path: Path, as_json: bool = False):
    """`obj` into `path` whole or not at all (jsonio.write_atomic). A checkpoint is serialised
    in memory first: a full disk then fails as the OSError of a plain write, not as torch's
    RuntimeError from inside its zip writer, and leaves no .tmp."""
    if as_json:
        jsonio.save(path, obj)
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    jsonio.write_atomic(path, buffer.getbuffer())


# What the files of a run folder must hold: field -> (test, what it must be).
_NUMBER = (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number")
_COUNT = (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
_DICT = (lambda v: isinstance(v, dict), "a dict")
_TENSOR = (torch.is_tensor, "a tensor")
_BEST = (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and _NUMBER[0](v[0])
         and isinstance(v[1], numbers.Integral) and not isinstance(v[1], bool), "[error, epoch]")
CHECKPOINT_FIELDS = {"model": _DICT, "optimizer": _DICT, "epoch": _COUNT, "config": _DICT, "data_rng": _TENSOR,
                     "torch_rng": _TENSOR, "best": _BEST, "memory": _DICT}
CHECKPOINT_KEYS = tuple(CHECKPOINT_FIELDS)
METRICS_FIELDS = {"epoch": _COUNT, "test_error": _NUMBER, "epoch_seconds": _NUMBER}
_ROWS = (lambda v: isinstance(v, list) and all(isinstance(r, dict) and all(ok(r.get(n)) for n, (ok, _)
                                                                         in METRICS_FIELDS.items()) for r in v),
         "a list of metrics rows")
_PARTS = (lambda v: isinstance(v, list) and all(isinstance(p, dict) and _COUNT[0](p.get("from_epoch")) for p in v),
          "a list of facts by part")
# Missing in checkpoints of older versions (a resume then keeps metrics.jsonl's lines as they are).
CHECKPOINT_OPTIONAL = {"metrics": _ROWS, "run_facts": _PARTS}
RESULT_FIELDS = {"final_error": _NUMBER, "best_error": _NUMBER, "best_epoch": _COUNT, "epochs": _COUNT,
                 "peak_activation_bytes": _NUMBER, "train_seconds": _NUMBER, "config": _DICT}
_TEXT = (lambda v: isinstance(v, str), "a string")
RESULT_OPTIONAL = {"paper_memory_bytes": _NUMBER,   # null or missing in results of older versions
                   "torch_version": _TEXT, "device_name": _TEXT, "threads": _COUNT, "commit": _TEXT}
MOVE_AWAY = "move it (or its whole run folder) away, or use another --out"


def check_fields(what: str, record, spec: dict, fix: str = MOVE_AWAY, optional: dict | None = None) -> None:
    """Refuse `record` (read from the file `what`) in one line naming the first field of
    `spec` it lacks or holds with the wrong type (of `optional`: holds, if not None)."""
    if not isinstance(record, dict):
        raise UsageError(f"{what} holds a {type(record).__name__}, not a dict of fields; {fix}")
    for name, (ok, kind) in [*spec.items(), *(optional or {}).items()]:
        required = name in spec
        if required and name not in record:
            raise UsageError(f"{what} has no '{name}' ({kind}); {fix}")
        if (required or record.get(name) is not None) and not ok(record[name]):
            value = repr(record[name]) if not isinstance(record[name], dict) else "a dict"
            raise UsageError(f"{what}: '{name}' is {value[:40]}, not {kind}; {fix}")


def load_checkpoint(path: Path, keys=("model", "config")) -> dict:
    """The checkpoint, which must hold `keys` with the right types (resuming needs all of
    CHECKPOINT_KEYS)."""
    fix = "move it away to start the run over"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: name it and the way out
        raise UsageError(f"checkpoint {path} is unreadable ({type(e).__name__}); {fix}") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in ("model", "config")):
        raise UsageError(f"checkpoint {path} is unreadable (not a checkpoint of this trainer); {fix}")
    check_fields(f"checkpoint {path}", ckpt, {k: CHECKPOINT_FIELDS[k] for k in keys}, fix,
                 optional=CHECKPOINT_OPTIONAL if set(keys) == set(CHECKPOINT_KEYS) else None)
    return ckpt


def read_run_json(path: Path) -> dict:
    """config.json or result.json of a run folder; a truncated or foreign file is a
    UsageError naming it (a run folder is never rewritten to 'repair' it)."""
    try:
        value = json.loads(path.read_text())
        error = None if isinstance(value, dict) else f"holds a {type(value).__name__}, not an object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        error = type(e).__name__
    if error:
        raise UsageError(f"{path} is unreadable ({error}); {MOVE_AWAY}")
    return value


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's (line, row) pairs. A last line cut short by a kill while it was written
    is dropped (its epoch has no checkpoint yet: resume trains it again); any other line that
    is not a row is named in one line."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is unreadable (UnicodeDecodeError); {MOVE_AWAY}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise UsageError(f"{path} line {n} is not JSON; {MOVE_AWAY}") from None
        check_fields(f"{path} line {n}", row, METRICS_FIELDS)
        rows.append((line, row))
    return rows


# Where a run lives and how fast it runs may change between its start and its resume;
# nothing else may (bf16 changes the rounding, so it stays). `deterministic` may: like
# cudnn_benchmark it picks among kernels computing the same function, and a run moved to
# another GPU model is not bit for bit anyway; a bit-exact resume needs it on in both parts.
# `check_every` only decides when a divergence is noticed.
MAY_CHANGE_ON_RESUME = {"out_dir", "device", "data_root", "download", "channels_last", "cudnn_benchmark",
                        "deterministic", "torch_compile", "reuse_cpu_memory", "context_impl", "check_every"}


def config_json(cfg) -> dict:
    return json.loads(jsonio.dumps(asdict(cfg)))  # tuples -> lists, as they come back from disk


def _defaults(cfg) -> dict:
    """The config of a run that sets nothing but its dataset (whose recipe fills batch size and
    lr), of `cfg`'s class."""
    return config_json(type(cfg)(dataset=cfg.dataset))


def config_diff(cfg, stored: dict) -> list[str]:
    """The config keys in which a stored run config differs from `cfg`, apart from where and
    how fast it runs (MAY_CHANGE_ON_RESUME); a key newer than the stored run counts with its
    default."""
    now = config_json(cfg)
    then = _defaults(cfg) | stored
    return sorted(k for k in set(now) | set(then) if k not in MAY_CHANGE_ON_RESUME and then.get(k) != now.get(k))


def run_name(cfg) -> str:
    """The default run folder name: `<dataset>-<arch>-K<k>-<mode>-<loss>`, then every other
    field that differs from its default (the seed included), as `<field><value>`, in the
    config's order: two configs that may not share a folder (config_diff) never share a name.
    The fields that may change on resume (where and how fast it runs) are left out.
        digits8-resnet32-K4-R1E-softmax-epochs2-batch_size64-train_subset128-seed1
    An arch such as `torchvision:resnet18` is written `torchvision_resnet18` (':' is not a
    file-name character everywhere)."""
    now, default = config_json(cfg), _defaults(cfg)
    parts = [cfg.dataset, cfg.arch.replace(":", "_"), f"K{cfg.k}", cfg.mode, cfg.loss]  # torchvision:x -> a portable name
    for name, value in now.items():
        if name in {"dataset", "arch", "k", "mode", "loss"} | MAY_CHANGE_ON_RESUME or value == default.get(name):
            continue
        if isinstance(value, bool):
            parts.append(name if value else f"no_{name}")
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"{name}{text}".replace("/", "_").replace(" ", ""))
    return "-".join(parts)


def check_same_config(cfg, stored: dict, path: Path) -> None:
    """Refuse to continue (or to report) a run that `path` says was another config."""
    if not isinstance(stored, dict):
        raise UsageError(f"{path} holds no config; move the run folder {path.parent} away or use another --out")
    diff = config_diff(cfg, stored)
    if diff:
        raise UsageError(f"{path} was written by a different config (differs in {diff}); "
                         f"use another --out or the same settings")


def finished_result(cfg, path: Path) -> dict:
    """The result.json of a finished run of `cfg`, checked field by field; reads, never writes."""
    result = read_run_json(path)
    check_fields(str(path), result, RESULT_FIELDS, optional=RESULT_OPTIONAL)
    check_same_config(cfg, result["config"], path)
    _check_folder_config(cfg, path.parent / "config.json")
    return result


def open_run(cfg, resume: bool, lock: ExitStack) -> tuple[dict | None, dict | None]:
    """What `train` checks before it touches a file: the model's combinations (cut tables,
    mode vs K), the device, --out, and what the run folder holds. Returns (checkpoint,
    result): the checkpoint of an unfinished run to resume, the result of a finished run
    of this very config, or (None, None) for a fresh start. Refuses a folder that holds a
    run without `resume`, and a run (finished or not) of other settings.

    Unless it only reads (`resume` of a finished run: nothing is written, nothing locked, so
    a read-only folder will do), it first takes the run folder's lock into `lock`, the
    caller's ExitStack, which holds it until the caller closes the stack: after result.json
    is written, or on any exit. Another live writer: RunFolderBusy, one line naming it,
    nothing touched. Refused after taking the lock: the lock file (and a new --out folder)
    is removed again; the stamp in an existing `.lock` says who took it last."""
    cfg.model_config()
    pick_device(cfg.device)
    out = Path(cfg.out_dir)
    ckpt_path, result_path, config_path = out / "ckpt.pt", out / "result.json", out / "config.json"
    if resume and result_path.is_file():   # finished: written once, for good; read without the lock
        return None, finished_result(cfg, result_path)
    check_writable_folder(out, "--out")
    lock.enter_context(run_lock(out))      # from here on, no one else writes the folder
    if ckpt_path.exists() or result_path.exists():
        if not resume:
            _check_folder_config(cfg, config_path)
            raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        if result_path.exists():   # finished while we waited for the lock
            return None, finished_result(cfg, result_path)
        ckpt = load_checkpoint(ckpt_path, CHECKPOINT_KEYS)
        check_same_config(cfg, ckpt["config"], ckpt_path)
        if ckpt["epoch"] >= cfg.epochs:
            raise UsageError(f"checkpoint {ckpt_path}: 'epoch' is {ckpt['epoch']}, past the run's last epoch "
                             f"{cfg.epochs - 1}; move it away to start the run over")
        _check_folder_config(cfg, config_path)
        return ckpt, None
    if config_path.exists() or (out / "metrics.jsonl").exists():  # started, killed before its first checkpoint
        if not resume:
            _check_folder_config(cfg, config_path)
            raise UsageError(f"{out} holds a run that stopped before its first checkpoint; pass --resume to "
                             f"start it over or choose another --out")
        _check_folder_config(cfg, config_path)   # starting over rewrites it: only if it is this run's own
    return None, None


def _check_folder_config(cfg, config_path: Path) -> None:
    """Refuse a run folder whose config.json (where there is one) is of another config: to
    resume, to report, or to start over in it (and without --resume, say that --resume
    would not help)."""
    if config_path.exists():
        check_same_config(cfg, read_run_json(config_path), config_path)


RUN_FILES = ("config.json", "metrics.jsonl", "ckpt.pt", "result.json", "error.json")


@dataclass
class RunLog:
    """What every checkpoint carries besides the states, for the run's files: the metrics
    rows so far (a resume restores metrics.jsonl from them: `resumed_metrics`) and the facts
    each part of the run trained under (provenance.facts_by_part, for result.json)."""
    rows: list
    facts: list

    def add(self, cfg, row: dict) -> None:
        """One epoch's row: a line more in metrics.jsonl, and in the next checkpoint."""
        append_metrics(cfg, row)
        self.rows.append(json.loads(jsonio.dumps(row)))   # as the line reads back


def prepare_run_folder(cfg, ckpt: dict | None, measure_memory, facts: dict) -> tuple[int, tuple, dict, RunLog]:
    """(first epoch, (best error, its epoch), memory, log) of the run, `facts` (run_facts)
    those of this process. Resuming: from the checkpoint, metrics.jsonl rewritten with the
    epochs before it (`resumed_metrics`: a line of an epoch that finished after it, or was
    cut short by a kill, is dropped; one lost is restored or named). New: config.json, an
    empty metrics.jsonl and `measure_memory()`. Called with the run folder's lock held: a
    .tmp left by a writer killed mid-write (SIGKILL) is removed."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        for tmp in out.glob(f"{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        start_epoch = ckpt["epoch"] + 1
        rows, note = resumed_metrics(metrics_path, start_epoch, ckpt.get("metrics"))
        if note:
            print(f"contsup: {note}", file=sys.stderr)
        jsonio.write_atomic(metrics_path, "".join(jsonio.dumps(row) + "\n" for row in rows))
        log = RunLog(rows, facts_by_part(ckpt.get("run_facts"), start_epoch, facts))
        return start_epoch, tuple(ckpt["best"]), ckpt["memory"], log
    atomic_save(config_json(cfg), out / "config.json", as_json=True)
    jsonio.write_atomic(metrics_path, "")
    return 0, (math.inf, -1), measure_memory(), RunLog([], facts_by_part(None, 0, facts))


def resumed_metrics(path: Path, start_epoch: int, vouched: list | None) -> tuple[list[dict], str | None]:
    """The metrics rows a resume from before `start_epoch` keeps, and one line naming the
    epochs whose line metrics.jsonl lost (deleted, damaged, edited), or None.

    `vouched`: the checkpoint's rows, restored whatever the file holds. A checkpoint of an
    older version keeps none: the file's rows are kept (a last line cut short by a kill is
    dropped, any other damaged line refused: read_metrics) and the epochs it lacks named."""
    found, damaged = _readable_rows(path)
    why = ("is missing" if not path.exists() else "is unreadable" if damaged is None
           else f"has damaged lines {damaged}" if damaged else "lacks or changed them")
    if vouched is None:
        rows = [row for _, row in read_metrics(path) if row["epoch"] < start_epoch] if path.exists() else []
        restored = []
    else:
        rows = [row for row in vouched if row["epoch"] < start_epoch]
        restored = [row["epoch"] for row in rows if found.get(row["epoch"]) != row]
    missing = sorted(set(range(start_epoch)) - {row["epoch"] for row in rows})
    notes = ([f"metrics of epochs {_epoch_list(restored)} restored from ckpt.pt ({path.name} {why})"] * bool(restored)
             + [f"epochs {_epoch_list(missing)} have no metrics line and ckpt.pt keeps none to restore "
                f"({path.name} {why}; a checkpoint of an older version): result.json counts the others only"]
             * bool(missing))
    return rows, (("warning: " if missing else "note: ") + "; ".join(notes)) if notes else None


def _readable_rows(path: Path) -> tuple[dict[int, dict], list[int] | None]:
    """({epoch: row} of the lines of metrics.jsonl that read as rows, numbers of those that do
    not: None if the file cannot be read as text at all)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}, []
    except (OSError, UnicodeDecodeError):
        return {}, None
    found, damaged = {}, []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            check_fields("", row, METRICS_FIELDS)
            found[row["epoch"]] = row
        except (json.JSONDecodeError, UsageError):
            damaged.append(n)
    return found, damaged


def _epoch_list(epochs: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans = []
    for e in epochs:
        if spans and spans[-1][1] == e - 1:
            spans[-1][1] = e
        else:
            spans.append([e, e])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)



def checkpoint(cfg, epoch: int, states: tuple[dict, dict], data_rng, best, memory: dict, *, log: RunLog) -> dict:
    """ckpt.pt: everything resume needs, after `epoch`, and the run's log (RunLog); `states`:
    the model's and the optimizer's state_dicts."""
    model_state, optimizer_state = states
    return {"model": model_state, "optimizer": optimizer_state, "epoch": epoch, "config": config_json(cfg),
            "data_rng": data_rng.get_state(), "torch_rng": torch.get_rng_state(), "best": list(best),
            "memory": memory, "metrics": log.rows, "run_facts": log.facts}


def save_checkpoint(cfg, epoch: int, states: tuple[dict, dict], data_rng, best, memory: dict, *,
                    log: RunLog) -> None:
    """Write the run's ckpt.pt (`checkpoint`), whole or not at all (atomic_save)."""
    atomic_save(checkpoint(cfg, epoch, states, data_rng, best, memory, log=log), Path(cfg.out_dir) / "ckpt.pt")


@contextmanager
def checkpoint_fits(cfg):
    """Around loading a checkpoint's states: one whose tensors do not fit (damaged, or from
    other code) is a UsageError naming it."""
    try:
        yield
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"checkpoint {Path(cfg.out_dir) / 'ckpt.pt'} does not fit this network "
                         f"({type(e).__name__}); move it away to start the run over") from None


def metrics_row(epoch: int, lr: float, *, train_error: float, test_error: float, local_losses: list,
                seconds: float, seen: int) -> dict:
    """One line of metrics.jsonl."""
    return {"epoch": epoch, "lr": lr, "train_error": train_error, "test_error": test_error,
            "local_losses": local_losses, "epoch_seconds": seconds, "images_per_s": seen / seconds}


def append_metrics(cfg, row: dict) -> None:
    """One line more in metrics.jsonl: the whole line or nothing (jsonio.append_line)."""
    jsonio.append_line(Path(cfg.out_dir) / "metrics.jsonl", row)


def end_epoch(cfg, row: dict, states: tuple[dict, dict], data_rng, best: tuple, memory: dict, *,
              log: RunLog) -> tuple:
    """The end of the epoch `row` (metrics_row) is of, for the trainer and the pipeline alike:
    the best test error so far, the metrics line (in `log` too), then the checkpoint
    (`states`: the model's and the optimizer's state_dicts). Returns the best (error, epoch)."""
    if row["test_error"] < best[0]:
        best = (row["test_error"], row["epoch"])
    log.add(cfg, row)
    save_checkpoint(cfg, row["epoch"], states, data_rng, best, memory, log=log)
    return best


def write_error(out: Path, record: dict) -> None:
    """error.json of a run stopped by a non-finite loss (epoch.stop_diverged)."""
    atomic_save(record, out / "error.json", as_json=True)


def finish_run(cfg, net, best: tuple, memory: dict, device, *, log: RunLog, **extra) -> dict:
    """Write result.json from the run's metrics and return it, with the facts that made it
    (provenance.result_facts: bit for bit holds on the same device, threads and versions)."""
    out = Path(cfg.out_dir)
    rows = [row for _, row in read_metrics(out / "metrics.jsonl")]
    missing = sorted(set(range(cfg.epochs)) - {row["epoch"] for row in rows})   # named on resume
    result = {"final_error": rows[-1]["test_error"], "best_error": best[0], "best_epoch": best[1],
              "epochs": cfg.epochs, **memory, "params": net.parts(), "cuts": net.cuts,
              "train_seconds": sum(r["epoch_seconds"] for r in rows), "device": str(device),
              **result_facts(log.facts), **({"epochs_without_metrics": missing} if missing else {}),
              "config": config_json(cfg), **extra}
    atomic_save(result, out / "result.json", as_json=True)
    return json.loads((out / "result.json").read_text())  # the same types as a skipped rerun returns
