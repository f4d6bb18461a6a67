"""Where and how a run computes: the device, deterministic kernels, the model's memory
format and context encoders, torch.compile. Speed machinery: none of it changes the
function the trainer computes (bf16 aside, which is the config's choice), and the method
never imports it. `cfg` below is a run's config (train.TrainConfig), read field by field. `prepare_model` is the one call the trainer, the pipeline's ranks and the
estimates make to put a model where it runs.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import types
from dataclasses import replace

import torch

from ..errors import UsageError
from ..model import ContSupNet
from .encoders import resolve_context_impl, set_context_impl


def pick_device(name: str = "auto") -> torch.device:
    """The device `name` (--device) means; one that is not there is a UsageError naming the fix."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        _note_unusable_driver()
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # meta, xla...: not training devices
        raise UsageError(f"unknown device '{name}'; choose auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda asked for, but {cuda_unusable_reason()}; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...); "
                         f"use --device cuda or auto")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps and mps.is_available()):
        raise UsageError("--device mps asked for, but this PyTorch has no Apple GPU; use --device cpu or auto")
    return device


@functools.lru_cache(maxsize=1)
def cuda_unusable_reason() -> str:
    """Why torch.cuda.is_available() is False, for a one-line error: a CUDA build of PyTorch
    that needs a newer NVIDIA driver than the installed one (CUDA's initialisation says so:
    "The NVIDIA driver on your system is too old (found version 12080)"), or no GPU."""
    if torch.version.cuda is None:
        return "this PyTorch is built without CUDA"
    try:
        torch.cuda.init()   # raises why it cannot start; is_available() keeps that to a warning
        return "no CUDA GPU is visible"
    except Exception as e:
        why = str(e)
    if not any(s in why.lower() for s in ("driver on your system is too old", "driver version is insufficient",
                                           "insufficient_driver", "insufficientdriver")):
        return "no CUDA GPU is visible"
    found = re.search(r"found version (\d+)", why)
    supports = f" (it supports CUDA {int(found[1]) // 1000}.{int(found[1]) % 1000 // 10})" if found else ""
    return (f"this PyTorch's CUDA {torch.version.cuda} build needs a newer NVIDIA driver than the installed one"
            f"{supports}: update the driver or install a PyTorch built for its CUDA")


@functools.lru_cache(maxsize=1)
def _note_unusable_driver() -> None:
    """--device auto on a machine whose driver is too old for this PyTorch: say so, once."""
    if torch.version.cuda is not None and "driver" in cuda_unusable_reason():
        print(f"contsup: warning: --device auto trains on the CPU: {cuda_unusable_reason()}", file=sys.stderr)


def use_device(device: torch.device) -> torch.device:
    """Make an indexed CUDA device the process's current one (torch.cuda.set_device): pinned
    host copies, cuBLAS/cuDNN handles and other implicit allocations go to the current
    device, so a run on cuda:N without it would also open a context on GPU 0."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


# cuBLAS's deterministic workspace setting (see use_deterministic).
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def use_deterministic(on: bool) -> None:
    """Deterministic kernels, process-wide (the run's config decides, on or off):
    torch.use_deterministic_algorithms, cudnn.deterministic, and cudnn.benchmark off (its
    timing picks algorithms by the clock). On a CPU the trainer is bit for bit without it (at
    the same thread count and versions); on CUDA, atomics-based kernels (convolution
    backward algorithms, index/scatter sums) make two runs, or a run and its resume, differ
    in the last bits unless it is on.

    cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before its first call in the process: the
    CLI (`cli.cmd_train`) sets it before anything touches CUDA, and this function sets it
    too (unless already set), which is in time when the process has not yet run a matmul
    on the GPU (a fresh process or notebook kernel: `train` calls this before the model is
    built on the device). Ops that have no deterministic CUDA kernel then raise instead of
    running: `check_deterministic` refuses the configurations that reach them."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False


def check_deterministic(net: ContSupNet, cfg, device) -> None:
    """With `deterministic` on CUDA, refuse what PyTorch can only run nondeterministically
    (it raises there under torch.use_deterministic_algorithms): the backward of bilinear
    upsampling (the --reconstruct decoders) and of adaptive average pooling to a side > 1
    (the plain context encoders: --context-impl plain, and --compile, which runs them; the
    lean and fused encoders pool with avg_pool2d, whose backward is deterministic, and a
    1x1 adaptive pool is a mean)."""
    if not (cfg.deterministic and device.type == "cuda"):
        return
    if cfg.reconstruct:
        raise UsageError("--deterministic on CUDA cannot train --reconstruct: PyTorch's bilinear upsampling "
                         "has no deterministic CUDA backward; drop one of the two")
    pools = [m for m in net.context.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)
             and m.output_size not in (1, (1, 1))]
    if pools and (cfg.context_impl == "plain" or cfg.torch_compile):
        raise UsageError("--deterministic on CUDA needs the lean or fused context encoders: the plain ones "
                         "(--context-impl plain, --compile) pool adaptively, which has no deterministic CUDA "
                         "backward; use --context-impl lean without --compile")


def resolved_for(cfg, device):
    """`cfg` with context_impl "auto" replaced by the implementation that runs on `device`
    (speed/encoders.resolve_context_impl), so that config.json, the checkpoint and result.json
    name it. context_impl may change on resume (MAY_CHANGE_ON_RESUME)."""
    return replace(cfg, context_impl=resolve_context_impl(cfg.context_impl, device, cfg.torch_compile,
                                                          cfg.deterministic))


def prepare_model(net: ContSupNet, cfg, device) -> ContSupNet:
    """Move `net` to the device in the memory format `cfg` asks for, with the context
    encoders run the way `cfg.context_impl` says (the same function each way), and the
    kernels deterministic or not as `cfg.deterministic` says (checked first, see there)."""
    check_deterministic(net, cfg, device)
    use_deterministic(cfg.deterministic)   # before the model reaches the device
    net = set_context_impl(net.to(device), resolve_context_impl(cfg.context_impl, device, cfg.torch_compile,
                                                                 cfg.deterministic))
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic
    return net


def _own_caller(part, i: int):
    """A function calling `part` (uncompiled) with a code object of its own."""
    def call(*args, **kwargs):
        return part._call_impl(*args, **kwargs)
    code = call.__code__.replace(co_name=f"call_part{i}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


def compile_model(net: ContSupNet, **options) -> ContSupNet:
    """torch.compile every part in place (state_dict keys stay the same); `options` go to
    torch.compile (e.g. backend="eager" in tests). The encoders then run their plain autograd
    version (speed/encoders.resolve_context_impl: inductor fuses BN/ReLU/pool by itself).

    Each part is compiled through a function with a code object of its own (`_own_caller`):
    dynamo keeps one cache of graphs per code object and caps it (recompile_limit, 8);
    `Module.compile` would put all the K modules, heads and context supplies in the one cache of
    its shared wrapper, overflow it beyond 8 parts (K=4 R1E has 11) and run the rest eagerly
    without a word. With a cache per part, a part recompiles only for what changes its own
    graph (eval mode, a last smaller batch)."""
    set_context_impl(net, "plain")
    for i, part in enumerate([*net.blocks, *net.heads, net.classifier, *net.context, *net.decoders]):
        part._compiled_call_impl = torch.compile(_own_caller(part, i), **options)
    return net


def to_format(x, channels_last: bool):
    """The input batch in the model's memory format."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
