"""Command line: `python -m contsup train|describe|download ...`.

Every bad input ends in one line on stderr naming the valid choices (or the fix), and exit
status 2 (a run folder another run writes is one: its holder is named); a training run that
diverges (non-finite loss) ends in one line naming where, and an error of the file system
itself (disk full...) in one line, both with exit status 1. SIGTERM and SIGHUP stop a run
as Ctrl-C does (errors.stop_on_signals), in one line, exit status 128 + the signal; the last
checkpoint stays for --resume. Output never fails on the terminal's encoding. JSON output
is strict (jsonio): no NaN/Infinity literals.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
import io
import os
import sys
import textwrap
import typing

from . import jsonio, tables
from .errors import DivergedError, Stopped, UsageError, exit_status, stop_on_signals
from .study import reproduce


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, no usage dump
        command = " ".join(self.prog.split()[1:])  # "" for the top level, else the subcommand
        raise UsageError(f"{message} (see `python -m contsup {command + ' ' if command else ''}--help`)")


def _numbers(text: str):
    """'5,1,0,0' -> (5.0, 1.0, 0.0, 0.0); text that is not numbers stays text, for the
    config's own check to refuse with its message."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        return text


def _ints(text: str):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers like 1,3, got '{text}'")


def _option(cls, name: str) -> dict:
    """The command line of field `name` of config dataclass `cls` (errors.option); a field a
    subclass redefines without one keeps its base's (TrainConfig.dataset)."""
    for c in cls.__mro__:
        f = getattr(c, "__dataclass_fields__", {}).get(name)
        if f is not None and "help" in f.metadata:
            return f.metadata
    raise TypeError(f"{cls.__name__}.{name} has no command line: declare it with errors.option(default, help)")


def add_config_flags(p: argparse.ArgumentParser, cls, only=None) -> None:
    """One flag per field of the config dataclass `cls` (of those of dataclass `only`, if
    given): its spelling and help from the field's metadata, its type from the annotation,
    its default from the dataclass, shown in the help but left to the config: a flag not
    given is absent from the parsed args (`given`). A bool that defaults to False is a
    switch --name; one that defaults to True is switched off by --no-name. Every value
    is checked by the config itself (its __post_init__), which raises the UsageError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(only)} if only is not None else None
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        meta, dashed = _option(cls, f.name), f.name.replace("_", "-")
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])  # int | None
        help = meta["help"]
        if kind is bool:
            spelling = meta["flag"] or ("--no-" if f.default else "--") + dashed
            kw = {"action": "store_false" if f.default else "store_true"}
            help += " (on by default; this flag turns it off)" if f.default else ""
        else:
            spelling = meta["flag"] or "--" + dashed
            kw = {"type": _numbers if kind is tuple else kind}
            if "choices" not in meta["argparse"]:   # --out OUT, not OUT_DIR
                kw["metavar"] = spelling.lstrip("-").replace("-", "_").upper()
            help += f" (default: {f.default})" if f.default is not None and "default" not in help else ""
        spellings = [spelling] + ([] if spelling.startswith("--") else ["--" + dashed])  # -k and --k
        help = help.replace("%", "%%")   # argparse formats help strings with %
        p.add_argument(*spellings, dest=f.name, default=argparse.SUPPRESS, help=help, **kw, **meta["argparse"])


def given(args, cls) -> dict:
    """The fields of config dataclass `cls` the command line gave (add_config_flags)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


TRAIN_DESCRIPTION = (
    "Train one configuration. The recipe follows the paper (METHOD.md §5) for the chosen dataset: "
    f"{tables.PAPER_SCHEDULE.epochs} epochs, {tables.PAPER_SCHEDULE.warmup_epochs} of them warm-up, SGD "
    "Nesterov with a cosine schedule, and the dataset's batch size and learning rate. "
    "The dataset is not the paper's unless named: it defaults to `digits`, scikit-learn's digits embedded at "
    "32x32 so that a run needs no download; the paper's are cifar10, svhn and stl10 (add --download). "
    "A first run of seconds: --dataset digits8 --epochs 4 --warmup-epochs 0 --batch-size 64 --lr 0.05.")


def build_parser() -> argparse.ArgumentParser:
    from .model import ModelConfig
    from .train import TrainConfig
    parser = _Parser(prog="contsup", description="ContSup: greedy local learning with context supply")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one configuration", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill(TRAIN_DESCRIPTION, 79, break_on_hyphens=False))
    add_config_flags(t, TrainConfig)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--pipeline", action="store_true",
                   help="module-parallel trainer (implied under torchrun with more than one process)")
    t.add_argument("--split", type=_ints, default=None,
                   help="pipeline: modules per rank, e.g. 1,3 (default: balanced by measured step time)")
    t.add_argument("--pipeline-depth", type=int, default=2, help="pipeline: messages in flight per link")
    t.add_argument("--rank-timeout", type=float, default=300.0,
                   help="pipeline: seconds before a silent rank counts as dead or hung")

    d = sub.add_parser("describe", help="cut points, parameters per part, peak activation memory",
                       description="What `train` with the same flags would build: the dataset and its image "
                                   "size, where the network is cut, the parameters of each part, the peak "
                                   "activation memory of one training step (and, with --stages, a pipeline "
                                   "split from counted FLOPs). The defaults are train's (dataset: digits).")
    add_config_flags(d, TrainConfig, only=ModelConfig)   # train's defaults: describe what train would train
    d.add_argument("--batch-size", type=int, default=256, help="batch size of the memory measurement")
    d.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.add_argument("--stages", type=int, default=None, metavar="G",
                   help="count each module's FLOPs in one training step at --batch-size (nothing is timed) "
                        "and print the split over G pipeline ranks that balances them, beside the equal split")

    g = sub.add_parser("download", help="fetch a dataset with torchvision")
    g.add_argument("--dataset", required=True, help="cifar10, svhn or stl10")
    g.add_argument("--data-root", default="data")

    r = sub.add_parser("reproduce", help="train every run of the paper's experiments, then tables and figures")
    reproduce.add_arguments(r)

    from .study.estimate import add_arguments as estimate_arguments
    e = sub.add_parser("estimate", help="GPU-hours of a profile's runs on an H100, from FLOPs counted on the CPU")
    estimate_arguments(e)
    parser.subcommands = sub.choices  # name -> its parser, whose error() names its --help
    return parser


def cmd_train(args) -> int:
    from .rundir import run_name
    from .train import TrainConfig, train
    cfg = TrainConfig(**given(args, TrainConfig))
    if cfg.deterministic:  # before anything touches CUDA: cuBLAS reads it once (train.use_deterministic)
        from .speed.setup import CUBLAS_WORKSPACE_CONFIG
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    if not hasattr(args, "out_dir"):   # every setting that is not the default is in the name: no two configs share it
        cfg.out_dir = os.path.join("runs", run_name(cfg))
    out = cfg.out_dir
    multi_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1   # a rank of torchrun's
    if multi_rank or args.pipeline:
        from .pipeline import RankFailure, train_pipelined
        try:  # under torchrun a run always resumes its checkpoint (--max-restarts restarts it)
            result = train_pipelined(cfg, resume=args.resume or "TORCHELASTIC_RUN_ID" in os.environ,
                                     progress=not args.no_progress, split=args.split, depth=args.pipeline_depth,
                                     timeout_s=args.rank_timeout)
        except RankFailure as e:
            print(f"contsup: error: {e}", file=sys.stderr, flush=True)
            os._exit(1)   # a process group with a lost peer cannot be torn down cleanly
        if int(os.environ.get("RANK", "0")) != 0:
            _leave_process_group()
    else:
        result = train(cfg, resume=args.resume, progress=not args.no_progress, note_fresh_start=True)
    print(f"{out}: test error {result['final_error']:.2f}% (best {result['best_error']:.2f}% "
          f"at epoch {result['best_epoch']}), peak activation memory "
          f"{result['peak_activation_bytes'] / 2**20:.1f} MiB"
          + (f", training memory as the paper counts it {result['paper_memory_bytes'] / 2**20:.1f} MiB"
             if result.get("paper_memory_bytes") is not None else ""))
    if multi_rank:
        _leave_process_group()
    return 0


def _leave_process_group():
    """A rank of a finished multi-rank run ends here, status 0, once its files are written and
    the group destroyed: the interpreter's own shutdown could meet a backend thread still
    alive and abort ("terminate called without an active exception", seen under load)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def describe(args) -> dict:
    from .model import ModelConfig
    from .train import TrainConfig
    from .wrap import build_net
    from .data import random_batch
    from .speed.encoders import encoder_impls, set_context_impl
    from .speed.memory import measure_step_memory
    if args.batch_size < 2:
        raise UsageError(f"--batch-size must be >= 2 for a training step, got {args.batch_size}")
    cfg = TrainConfig(**given(args, ModelConfig)).model_config()   # with train's defaults (digits)
    net = build_net(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    report = {"config": vars(cfg) | {"loss_scales": cfg.loss_scales}, "image_size": net.image_size,
              "num_classes": net.num_classes, "cut_points": net.cuts,
              "modules": len(net.blocks), "params": net.parts(), "loss_weights": net.loss_weights,
              "module_table": [{"module": k, "input_shape": list(net.shapes[k]),
                                "params": count(net.blocks[k]) + (count(net.classifier) if k == net.k - 1 else 0),
                                "head_params": count(net.heads[k]) if k < len(net.heads) else 0,
                                "context_params": count(net.context[k - 1]) if k else 0}
                               for k in range(net.k)]}
    if not args.no_memory:
        x, y, image = random_batch(cfg.dataset, args.batch_size, cfg.reconstruct)
        mem = measure_step_memory(set_context_impl(net, "lean"), x, y, image)  # as the trainer runs it
        report |= {"encoder_impls": encoder_impls(net),
                   "batch_size": args.batch_size, "peak_activation_MiB": mem["peak_activation_bytes"] / 2**20,
                   "paper_memory_MiB": mem["paper_memory_bytes"] / 2**20,
                   "paper_memory_parts_MiB": {k: v / 2**20 for k, v in mem["paper_memory_parts"].items()}}
    if args.stages is not None:
        from . import pipeline
        # counted FLOPs, not timed steps: seconds of CPU whatever the batch (timing K modules at
        # batch 256 on a CPU took a minute); the trainer balances the times it measures itself
        flops = pipeline.count_module_flops(set_context_impl(net, "lean"), args.batch_size,  # as the trainer runs
                                            lambda n: random_batch(cfg.dataset, n, cfg.reconstruct))
        g = args.stages
        equal = [round(i * net.k / g) for i in range(g + 1)] if 1 <= g <= net.k else None
        gflops = [f / 1e9 for f in flops]
        report["stages"] = {"module_gflops": gflops, "batch_size": args.batch_size,
                            "cost": "counted FLOPs (conv + matmul, forward + backward) of one training step",
                            "balanced": pipeline.predicted_speedup(gflops, pipeline.balanced_split(gflops, g)),
                            "equal": pipeline.predicted_speedup(gflops, equal)}
    return report


def cmd_describe(args) -> int:
    report = describe(args)
    if args.json:
        print(jsonio.dumps(report, indent=2))
        return 0
    c, side = report["config"], report["image_size"]
    print(f"{c['arch']} K={report['modules']} mode={c['mode']} on {c['dataset']} "
          f"({side}x{side} images, {report['num_classes']} classes)")
    paper = c["arch"] in tables.BLOCKS_PER_STAGE
    print(f"  cut points {'(stage, block)' if paper else '(after the module)'}: {report['cut_points']}")
    for part, n in report["params"].items():
        print(f"  {part:>17}: {n:,} parameters")
    print("  module  input shape         parameters  its head  context into it")
    for row in report["module_table"]:
        print(f"  {row['module']:>6}  {str(row['input_shape']):<18} {row['params']:>11,} {row['head_params']:>9,} "
              f"{row['context_params']:>16,}")
    if "peak_activation_MiB" in report:
        print(f"  peak activation memory of one training step at batch {report['batch_size']}: "
              f"{report['peak_activation_MiB']:.1f} MiB (lean encoders, as the trainer runs them; "
              f"encoders run {report['encoder_impls']})")
        parts = report["paper_memory_parts_MiB"]
        print(f"  training memory as the paper counts it (GPU): {report['paper_memory_MiB']:.1f} MiB = "
              f"parameters {parts['parameters']:.1f} + gradients {parts['gradients']:.1f} + "
              f"SGD momentum {parts['optimizer_state']:.1f} + "
              f"peak activations of the plain encoders {parts['plain_peak_activation_bytes']:.1f}")
    if "stages" in report:
        st = report["stages"]
        print(f"  pipeline over {len(st['balanced']['stage_costs'])} ranks, stage costs from {st['cost']} "
              f"at batch {st['batch_size']} (not timed; communication not counted):")
        purpose = {"balanced": "the fewest GFLOPs on the busiest rank; `train` splits by the step times it measures",
                   "equal": "modules shared out as evenly as K allows, to compare with"}
        for name in ("balanced", "equal"):
            p = st[name]
            sizes = [b - a for a, b in zip(p["bounds"], p["bounds"][1:])]
            print(f"    {name:>8}: modules per rank {sizes} (`train --split {','.join(map(str, sizes))}`), stage GFLOPs "
                  f"[{', '.join(f'{s:.1f}' for s in p['stage_costs'])}], predicted speed-up {p['speedup']:.2f}x, "
                  f"bubble {100 * p['bubble']:.0f}%: {purpose[name]}")
    return 0


def cmd_download(args) -> int:
    from .data import download
    if args.dataset in tables.EMBEDDED_DATASETS:
        raise UsageError("digits ships with scikit-learn; nothing to download")
    tables.check_dataset(args.dataset)
    download(args.dataset, args.data_root)
    print(f"{args.dataset} is in {args.data_root}")
    return 0


def cmd_estimate(args) -> int:
    from .study import estimate
    result = estimate.estimate(args.profile, args.only, utilisation=args.utilisation, peak_tflops=args.peak_tflops,
                               precision=args.precision, progress=not args.no_progress, calibrate=args.calibrate)
    if args.json:
        print(jsonio.dumps(result, indent=2))
    else:
        print(estimate.markdown(result) if args.markdown else estimate.format_table(result))
    return 0


COMMANDS = {"train": cmd_train, "describe": cmd_describe, "download": cmd_download, "reproduce": reproduce.main,
            "estimate": cmd_estimate}


def readable_output() -> None:
    """Output never fails on the terminal's encoding (PYTHONIOENCODING=ascii, a C locale): what
    it cannot show is written as an escape (\\xe9), not raised as UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, io.UnsupportedOperation):  # not a TextIOWrapper: leave it
            pass


def main(argv=None) -> int:
    """Run one command; every way it can end is one line on stderr (if any) and an exit status."""
    readable_output()
    command = None
    with stop_on_signals():   # SIGTERM, SIGHUP -> Stopped, a KeyboardInterrupt, in the main thread
        try:
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            command = args.command
            if extra:  # named with the subcommand whose --help lists the valid flags
                parser.subcommands[args.command].error(
                    f"unrecognized arguments: {' '.join(extra)}")
            return COMMANDS[args.command](args)
        except UsageError as e:
            print(f"contsup: error: {e}", file=sys.stderr)
            return 2
        except DivergedError as e:  # valid input, a run gone wrong: not a usage error
            print(f"contsup: error: {e}", file=sys.stderr)
            return 1
        except OSError as e:  # the file system said no (disk full, a file vanished...): one line, not a traceback
            print(f"contsup: error: {e.strerror if e.filename is None and e.strerror else e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:  # Ctrl-C, or a signal (Stopped)
            what = f"stopped by {e}" if isinstance(e, Stopped) else "interrupted"
            then = ("; the last checkpoint is kept: rerun the same command with --resume to continue"
                    if command == "train" else "")
            print(f"contsup: {what}{then}", file=sys.stderr)
            return exit_status(e)
