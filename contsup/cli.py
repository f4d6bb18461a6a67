"""Command line: `python -m contsup train|describe|download ...`.

Every bad input ends in one line on stderr naming the valid choices (or the fix), and exit
status 2; a training run that diverges (non-finite loss) ends in one line naming where, and
an error of the file system itself (disk full...) in one line, both with exit status 1.
JSON output is strict (jsonio): no NaN/Infinity literals.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
import os
import sys

from . import jsonio, tables
from .errors import DivergedError, UsageError
from .study import reproduce


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, no usage dump
        command = " ".join(self.prog.split()[1:])  # "" for the top level, else the subcommand
        raise UsageError(f"{message} (see `python -m contsup {command + ' ' if command else ''}--help`)")


def _scales(text: str):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--loss-scales takes four numbers like 5,1,0,0, got '{text}'")
    return values


def _ints(text: str):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers like 1,3, got '{text}'")


def _model_args(p: argparse.ArgumentParser):
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(tables.DATA_RECIPES)}")
    p.add_argument("--arch", default="resnet32", help=f"one of {', '.join(tables.BLOCKS_PER_STAGE)}")
    p.add_argument("-k", "--k", type=int, default=4, help="number of local modules (1 = end-to-end)")
    p.add_argument("--mode", default="R1E", help="context supply: R0, E, R1, R1E, R2, ..., R16, RnE")
    p.add_argument("--loss", default="softmax", help="local head loss: softmax or contrast")
    p.add_argument("--head", default="1c2f", help="auxiliary head config: 0c1f 0c2f 1c1f 1c2f 1c3f 2c2f")
    p.add_argument("--reconstruct", action="store_true", help="add the reconstruction decoder loss")
    p.add_argument("--loss-scales", type=_scales, default=None,
                   help="ixx_1,ixy_1,ixx_2,ixy_2 for --reconstruct (default: the paper's table)")
    p.add_argument("--balanced", action="store_true", help="memory-balanced cut points (the paper's E*)")
    p.add_argument("--widen", type=float, default=1.0, help="width multiplier of heads and encoders")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="contsup", description="ContSup: greedy local learning with context supply")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one configuration")
    _model_args(t)
    t.add_argument("--epochs", type=int, default=160)
    t.add_argument("--batch-size", type=int, default=None, help="default: the paper's for the dataset")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate; default: the paper's")
    t.add_argument("--warmup-epochs", type=int, default=tables.PAPER_SCHEDULE.warmup_epochs)
    t.add_argument("--data-root", default="data")
    t.add_argument("--download", action="store_true", help="fetch the dataset with torchvision if missing")
    t.add_argument("--train-subset", type=int, default=None, help="train on the first N images only")
    t.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<arch>-K<k>-<mode>-<loss>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--context-impl", choices=["auto", "lean", "fused", "plain"], default="auto",
                   help="how the context encoders run, the same function each way: lean (recompute, least "
                        "memory), fused (faster, more memory), plain (autograd reference); auto (default): "
                        "lean on a CPU, plain on a GPU or with --compile")
    t.add_argument("--no-channels-last", action="store_true", help="keep NCHW activations (default: NHWC)")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes")
    t.add_argument("--no-cudnn-benchmark", action="store_true", help="CUDA: don't let cuDNN pick algorithms")
    t.add_argument("--compile", action="store_true", help="torch.compile the modules (slow first epoch)")
    t.add_argument("--no-reuse-cpu-memory", action="store_true",
                   help="CPU: leave glibc's malloc as it is (default: freed activations are reused, not unmapped)")
    t.add_argument("--pipeline", action="store_true",
                   help="module-parallel trainer (implied under torchrun with more than one process)")
    t.add_argument("--split", type=_ints, default=None,
                   help="pipeline: modules per rank, e.g. 1,3 (default: balanced by measured step time)")
    t.add_argument("--pipeline-depth", type=int, default=2, help="pipeline: messages in flight per link")
    t.add_argument("--rank-timeout", type=float, default=300.0,
                   help="pipeline: seconds before a silent rank counts as dead or hung")

    d = sub.add_parser("describe", help="cut points, parameters per part, peak activation memory")
    _model_args(d)
    d.add_argument("--batch-size", type=int, default=256, help="batch size of the memory measurement")
    d.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.add_argument("--stages", type=int, default=None, metavar="G",
                   help="time each module's step and print the balanced split over G pipeline ranks")

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


def _model_kwargs(args) -> dict:
    """The ModelConfig fields, as the command line gave them (every one is a flag)."""
    from .model import ModelConfig
    return {f.name: getattr(args, f.name) for f in fields(ModelConfig)}


def cmd_train(args) -> int:
    from .train import TrainConfig, open_run, train
    out = args.out if args.out is not None else f"runs/{args.dataset}-{args.arch}-K{args.k}-{args.mode}-{args.loss}"
    cfg = TrainConfig(**_model_kwargs(args), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      warmup_epochs=args.warmup_epochs, data_root=args.data_root, download=args.download,
                      train_subset=args.train_subset, out_dir=out, device=args.device, seed=args.seed,
                      context_impl=args.context_impl, channels_last=not args.no_channels_last, bf16=args.bf16,
                      cudnn_benchmark=not args.no_cudnn_benchmark, torch_compile=args.compile,
                      reuse_cpu_memory=not args.no_reuse_cpu_memory)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.pipeline:
        from .pipeline import RankFailure, train_pipelined
        try:  # under torchrun a run always resumes its checkpoint (--max-restarts restarts it)
            result = train_pipelined(cfg, resume=args.resume or "TORCHELASTIC_RUN_ID" in os.environ,
                                     progress=not args.no_progress, split=args.split, depth=args.pipeline_depth,
                                     timeout_s=args.rank_timeout)
        except RankFailure as e:
            print(f"contsup: error: {e}", file=sys.stderr, flush=True)
            os._exit(1)   # a process group with a lost peer cannot be torn down cleanly
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    else:
        # train() checks the same first; here before the note, so that a bad input is one line, nothing else
        if args.resume and open_run(cfg, resume=True) == (None, None):
            print(f"contsup: note: nothing to resume in {out} (no ckpt.pt); starting a fresh run", file=sys.stderr)
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"{out}: test error {result['final_error']:.2f}% (best {result['best_error']:.2f}% "
          f"at epoch {result['best_epoch']}), peak activation memory "
          f"{result['peak_activation_bytes'] / 2**20:.1f} MB"
          + (f", training memory as the paper counts it {result['paper_memory_bytes'] / 2**20:.1f} MB"
             if result.get("paper_memory_bytes") is not None else ""))
    return 0


def describe(args) -> dict:
    from .model import ContSupNet, ModelConfig
    from .data import random_batch
    from .speed.encoders import set_context_impl
    from .speed.memory import measure_step_memory
    if args.batch_size < 2:
        raise UsageError(f"--batch-size must be >= 2 for a training step, got {args.batch_size}")
    cfg = ModelConfig(**_model_kwargs(args))
    net = ContSupNet(cfg)
    report = {"config": vars(cfg) | {"loss_scales": cfg.loss_scales}, "cut_points": net.cuts,
              "modules": len(net.blocks), "params": net.parts(), "loss_weights": net.loss_weights}
    if not args.no_memory:
        x, y, image = random_batch(cfg.dataset, args.batch_size, cfg.reconstruct)
        mem = measure_step_memory(set_context_impl(net, "lean"), x, y, image)  # as the trainer runs it
        report |= {"batch_size": args.batch_size, "peak_activation_MB": mem["peak_activation_bytes"] / 2**20,
                   "paper_memory_MB": mem["paper_memory_bytes"] / 2**20,
                   "paper_memory_parts_MB": {k: v / 2**20 for k, v in mem["paper_memory_parts"].items()}}
    if args.stages is not None:
        import torch
        from . import pipeline
        x, y, image = random_batch(cfg.dataset, args.batch_size, cfg.reconstruct)
        cl = torch.channels_last   # the trainer's default memory format
        seconds = pipeline.profile_modules(net.to(memory_format=cl), x.contiguous(memory_format=cl), y, image)
        g = args.stages
        equal = [round(i * net.k / g) for i in range(g + 1)] if 1 <= g <= net.k else None
        report["stages"] = {"module_seconds": seconds, "batch_size": args.batch_size,
                            "balanced": pipeline.predicted_speedup(seconds, pipeline.balanced_split(seconds, g)),
                            "equal": pipeline.predicted_speedup(seconds, equal)}
    return report


def cmd_describe(args) -> int:
    report = describe(args)
    if args.json:
        print(jsonio.dumps(report, indent=2))
        return 0
    print(f"{report['config']['arch']} K={report['modules']} mode={report['config']['mode']}")
    print(f"  cut points (stage, block): {report['cut_points']}")
    for part, n in report["params"].items():
        print(f"  {part:>17}: {n:,} parameters")
    if "peak_activation_MB" in report:
        print(f"  peak activation memory of one training step at batch {report['batch_size']}: "
              f"{report['peak_activation_MB']:.1f} MB (lean encoders, as the trainer runs them)")
        parts = report["paper_memory_parts_MB"]
        print(f"  training memory as the paper counts it (GPU): {report['paper_memory_MB']:.1f} MB = "
              f"parameters {parts['parameters']:.1f} + gradients {parts['gradients']:.1f} + "
              f"SGD momentum {parts['optimizer_state']:.1f} + "
              f"peak activations of the plain encoders {parts['plain_peak_activation_bytes']:.1f}")
    if "stages" in report:
        st = report["stages"]
        print(f"  pipeline over {len(st['balanced']['stage_seconds'])} ranks (step times measured at batch "
              f"{st['batch_size']}, communication not counted):")
        for name in ("balanced", "equal"):
            p = st[name]
            sizes = [b - a for a, b in zip(p["bounds"], p["bounds"][1:])]
            print(f"    {name:>8}: modules per rank {sizes}, stage seconds "
                  f"[{', '.join(f'{s:.3f}' for s in p['stage_seconds'])}], predicted speed-up {p['speedup']:.2f}x, "
                  f"bubble {100 * p['bubble']:.0f}%")
    return 0


def cmd_download(args) -> int:
    from .data import download
    if args.dataset in ("digits", "digits8"):
        raise UsageError("digits ships with scikit-learn; nothing to download")
    tables.check_dataset(args.dataset)
    download(args.dataset, args.data_root)
    print(f"{args.dataset} is in {args.data_root}")
    return 0


def cmd_estimate(args) -> int:
    from .study import estimate
    result = estimate.estimate(args.profile, args.only, args.utilisation, args.peak_tflops, args.precision,
                               progress=not args.no_progress)
    if args.json:
        print(jsonio.dumps(result, indent=2))
    else:
        print(estimate.markdown(result) if args.markdown else estimate.format_table(result))
    return 0


COMMANDS = {"train": cmd_train, "describe": cmd_describe, "download": cmd_download, "reproduce": reproduce.main,
            "estimate": cmd_estimate}


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
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
        print(f"contsup: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("contsup: interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130
