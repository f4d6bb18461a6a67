"""Peak activation memory of one training step, device-independent.

`ActivationMemoryTracker` is a `TorchDispatchMode`: every aten op run inside it (forward,
backward -- autograd carries the mode into the engine -- and `torch.no_grad()` code) passes
through `__torch_dispatch__`, which looks at the storages of the op's outputs:

* a storage not seen before, returned by an op whose schema says the output is fresh (no
  alias annotation), is a new allocation: its `nbytes()` is added to the live total, and a
  weak reference on the storage object subtracts it again when the storage is freed (torch
  keeps one Python object per storage for the storage's whole life, so its weakref callback
  fires exactly when the memory is released; O(1) per op, no scanning);
* views, `detach`, in-place and `out=` results share a storage already known: nothing is
  added (a storage is counted once however many tensors view it); a resize is followed;
* an aliasing result whose storage was never seen belongs to a tensor made before the mode
  (parameters, buffers, data the caller did not list in `inputs`): it is never counted.

The live total is sampled after every op; the peak is the largest sample. Counted: saved
activations, temporaries, recomputed tensors, activation gradients, the `inputs` given.
Not counted: the storages of `exclude` (parameters and buffers of the modules given, tensors
given, an optimizer's parameters and state) and the gradients of the excluded parameters. A
parameter's gradient is an ordinary op output (e.g. the `mm` in a Linear backward) that the
autograd engine hands to AccumulateGrad a moment later, so it is recognised only after it was
counted: a hook on each excluded parameter (`register_hook`, which sees the incoming gradient,
and `register_post_accumulate_grad_hook`, which sees `.grad`) excludes that storage
retroactively, i.e. it is also taken out of every sample since the storage was created. A
huge parameter therefore never shows up in the peak, not even through its gradient.

`reuse_freed_cpu_memory` is about speed, not measurement: it keeps glibc's malloc from
handing large freed blocks back to the OS (see there).

`cuda_peak_bytes` is the device's own number (`torch.cuda.max_memory_allocated`) for a step
that starts, as the tracker's and as a training step, with no parameter gradients: it counts
what the tracker counts plus the parameters' gradients, cuDNN/cuBLAS workspaces and the
allocator's rounding.
"""
from __future__ import annotations

import copy
import ctypes
import weakref
from array import array
from functools import partial

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..step import local_learning_step
from .encoders import EncoderChain, set_context_impl

__all__ = ["ActivationMemoryTracker", "peak_activation_bytes", "cuda_peak_bytes"]

_HISTORY_LIMIT = 1 << 21  # samples kept for retroactive corrections; older ones are folded


def _storage(t):
    """The untyped storage of a dense tensor, or None (sparse, nested, meta, no storage)."""
    if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _check_storage_identity():
    t = torch.empty(1)
    if t.untyped_storage() is not t.untyped_storage():  # pragma: no cover - old torch
        raise RuntimeError("ActivationMemoryTracker needs a torch that keeps one Python object per "
                           f"storage (PyObject preservation); torch {torch.__version__} does not")


class ActivationMemoryTracker(TorchDispatchMode):
    """with ActivationMemoryTracker(model_or_params, inputs=(x,)) as t: <forward+backward>; t.peak_bytes

    exclude: an nn.Module, tensor, optimizer, or an iterable of those; their storages
      (parameters, buffers, optimizer state) are not counted, nor the gradients of their
      parameters created during the step (new or accumulated).
    inputs: tensors (or nested lists/tuples/dicts of them) made before the mode that are alive
      during the step and should be counted, e.g. the image batch and the labels.

    After the block: `peak_bytes` (the most bytes alive at once), `live_bytes` (alive at exit,
    e.g. the loss and the outputs still referenced). `peak_bytes` may also be read inside.
    """

    def __init__(self, exclude=(), inputs=()):
        super().__init__()
        _check_storage_identity()
        self._exclude_spec, self._inputs_spec = exclude, inputs
        self._alias = {}          # op -> per-return "may alias an input" flags
        self._reset()

    # -------------------------------------------------------------------------------
    def _reset(self):
        self.live_bytes = 0
        self._peak = None         # set at exit
        self._tracked = {}        # storage key -> [nbytes, sample index at creation]
        self._skip = set()        # storage keys never counted (excluded / made before the mode)
        self._refs = {}           # storage key -> weakref whose callback forgets the key
        self._hist = array("q")   # live bytes after each op (index offset by _hist_base)
        self._hist_base = 0       # samples folded away so far
        self._folded_peak = 0     # max of the folded samples
        self._hooks = []

    def _watch(self, storage, key):
        if key not in self._refs:
            self._refs[key] = weakref.ref(storage, partial(self._on_free, key))

    def _on_free(self, key, _ref):
        entry = self._tracked.pop(key, None)
        if entry is not None:
            self.live_bytes -= entry[0]
        self._skip.discard(key)
        if self._refs.get(key) is _ref:
            del self._refs[key]

    def _track(self, storage, key):
        self._tracked[key] = [storage.nbytes(), self._hist_base + len(self._hist)]
        self.live_bytes += storage.nbytes()
        self._watch(storage, key)

    def _exclude_storage(self, storage):
        """Never count this storage; if it was counted, take it out of the history too."""
        key = storage._cdata
        entry = self._tracked.pop(key, None)
        if entry is not None:
            nbytes, created = entry
            self.live_bytes -= nbytes
            hist = self._hist
            for i in range(max(created - self._hist_base, 0), len(hist)):
                hist[i] -= nbytes
        self._skip.add(key)
        self._watch(storage, key)

    def _exclude_grad(self, t):
        s = _storage(t)
        if s is not None:
            self._exclude_storage(s)

    def _grad_hook(self, grad):          # incoming gradient, before accumulation
        self._exclude_grad(grad)

    def _post_accumulate_hook(self, param):  # .grad after accumulation (stolen or cloned)
        self._exclude_grad(param.grad)

    def _excluded_tensors(self):
        spec = self._exclude_spec
        items = [spec] if isinstance(spec, (nn.Module, torch.Tensor, torch.optim.Optimizer)) else list(spec)
        for item in items:
            if isinstance(item, nn.Module):
                yield from item.parameters()
                yield from item.buffers()
            elif isinstance(item, torch.optim.Optimizer):
                for group in item.param_groups:
                    yield from group["params"]
                for state in item.state.values():
                    yield from (v for v in tree_leaves(state) if isinstance(v, torch.Tensor))
            elif isinstance(item, torch.Tensor):
                yield item
            else:
                raise TypeError(f"exclude: expected modules, tensors or optimizers, got {type(item).__name__}")

    # -------------------------------------------------------------------------------
    def __enter__(self):
        self._reset()
        seen_params = set()
        for t in self._excluded_tensors():
            s = _storage(t)
            if s is not None:
                self._skip.add(s._cdata)
                self._watch(s, s._cdata)
            if t.is_leaf and t.grad is not None:
                self._exclude_grad(t.grad)
            if t.requires_grad and t.is_leaf and id(t) not in seen_params:
                seen_params.add(id(t))
                self._hooks.append(t.register_hook(self._grad_hook))
                self._hooks.append(t.register_post_accumulate_grad_hook(self._post_accumulate_hook))
        for t in tree_leaves(self._inputs_spec):
            s = _storage(t)
            if s is not None and s._cdata not in self._skip and s._cdata not in self._tracked:
                self._track(s, s._cdata)
        self._hist.append(self.live_bytes)
        return super().__enter__()

    def __exit__(self, exc_type, exc, tb):
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            for h in self._hooks:
                h.remove()
            self._peak = self.peak_bytes
            # Drop the weakrefs: no callback fires after the block, the cycle through self goes.
            self._refs.clear()
            self._tracked.clear()
            self._skip.clear()
            self._hooks = []

    @property
    def peak_bytes(self) -> int:
        if self._peak is not None:
            return self._peak
        return max(self._folded_peak, max(self._hist, default=0))

    # -------------------------------------------------------------------------------
    def _alias_flags(self, func):
        flags = self._alias.get(func)
        if flags is None:
            try:
                flags = tuple(r.alias_info is not None for r in func._schema.returns)
            except AttributeError:  # not an OpOverload: assume fresh outputs
                flags = ()
            self._alias[func] = flags
        return flags

    def _record(self, t, aliasing):
        s = _storage(t)
        if s is None:
            return
        key = s._cdata
        entry = self._tracked.get(key)
        if entry is not None:
            n = s.nbytes()
            if n != entry[0]:          # resized in place (resize_, out= ops)
                self.live_bytes += n - entry[0]
                entry[0] = n
        elif key in self._skip:
            return
        elif aliasing:                 # a view/in-place result of a tensor made before the mode
            self._skip.add(key)
            self._watch(s, key)
        else:
            self._track(s, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flags = self._alias_flags(func)
        if isinstance(out, torch.Tensor):
            self._record(out, bool(flags) and flags[0])
        elif isinstance(out, (tuple, list)):
            many = len(flags) == 1 and len(out) != 1  # a single Tensor[] return
            for i, o in enumerate(out):
                aliasing = flags[0] if many else (flags[i] if i < len(flags) else False)
                if isinstance(o, torch.Tensor):
                    self._record(o, aliasing)
                elif isinstance(o, (tuple, list)):
                    for t in o:
                        self._record(t, aliasing)
        self._hist.append(self.live_bytes)
        if len(self._hist) >= _HISTORY_LIMIT:
            half = len(self._hist) // 2
            self._folded_peak = max(self._folded_peak, max(self._hist[:half]))
            del self._hist[:half]
            self._hist_base += half
        return out


def peak_activation_bytes(step_fn, exclude, inputs=()) -> int:
    """Run step_fn() under an ActivationMemoryTracker and return its peak in bytes."""
    with ActivationMemoryTracker(exclude, inputs=inputs) as t:
        step_fn()
    return t.peak_bytes


def cuda_peak_bytes(step_fn, device, params=()) -> int | None:
    """torch.cuda.max_memory_allocated during step_fn(), minus what was allocated before it
    (parameters, the data, optimizer state, ...); None when `device` is not a CUDA device.

    The gradients of `params` (the stepped model's parameters) are cleared first, set to None
    as the trainer's optimizer.zero_grad(set_to_none=True) leaves them, so the step allocates
    them and the peak includes them. The number is then activations (what
    `peak_activation_bytes` counts) + the parameters' gradients + workspaces + the
    allocator's rounding: compare it with peak_activation_bytes + the gradients' bytes."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    for p in params:
        p.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step_fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def reuse_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide; returns whether it did).

    By default glibc serves every block over 32 MB (most activations of a batch-256 step)
    from a fresh mmap and unmaps it on free, so each new tensor's pages fault in, zeroed by
    the kernel, on first touch: in the context encoders that can cost as much as the op that
    fills the tensor (`benchmarks/bench_step.py --no-reuse-memory` measures the difference;
    tests/test_performance.py counts the page faults). Here no block comes from mmap and the
    heap is trimmed only past 2 GB free, so the memory of one step is reused by the next.
    PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or tcmalloc.
    No effect (False) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def measure_step_memory(net, x, y, image=None, bf16: bool = False) -> dict:
    """Memory of one training step, measured on copies (the model is untouched):

    - `peak_activation_bytes`: peak activation bytes of the path that runs (the net's own
      encoders' implementation; device-independent: the tracker above), and `cuda_peak_bytes`:
      torch.cuda.max_memory_allocated on CUDA (else None), which includes the gradients;
    - `paper_memory_bytes`: training memory as the paper counts it on a GPU, the sum of
      `paper_memory_parts`: parameters + their gradients + the optimizer state (SGD's one
      momentum buffer per parameter) + the peak activations of the authors' plain encoders
      (context_impl "plain": one more measured step, where the net has context encoders
      and runs another path).
      Our default lean encoders allocate far less than theirs: only this sum stands beside
      the paper's memory numbers.
    """
    def measure(impl):
        probe = set_context_impl(copy.deepcopy(net).train(), impl) if impl else copy.deepcopy(net).train()
        step = lambda: local_learning_step(probe, x, y, image, bf16)  # noqa: E731
        inputs = [x, y] + ([image] if image is not None else [])
        return probe, step, peak_activation_bytes(step, exclude=[probe], inputs=inputs)

    probe, step, peak = measure(None)
    cuda_peak = cuda_peak_bytes(step, x.device, probe.parameters())  # the tracker's step left .grad
    swapped = any(isinstance(m, EncoderChain) for m in net.modules())   # lean or fused encoders
    plain_peak = measure("plain")[2] if swapped else peak
    trained = [p for p in net.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in trained)
    parts = {"parameters": param_bytes, "gradients": grad_bytes,
             "optimizer_state": grad_bytes,   # SGD momentum: one fp32 buffer per trained parameter
             "plain_peak_activation_bytes": plain_peak}
    return {"peak_activation_bytes": peak, "cuda_peak_bytes": cuda_peak,
            "paper_memory_bytes": sum(parts.values()), "paper_memory_parts": parts}
