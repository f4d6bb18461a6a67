"""What crosses a cut, and how: which rank owns which parameters (`module_of`), what each link
carries (`stage_needs`, `link_slots`), the message format (`pack`/`unpack`: one flat buffer)
and the links themselves (`Link`: a ring of in-flight buffers between two ranks).
"""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

from ..model import ContSupNet

TRAIN, EVAL = 0, 1   # a message's kind: a training or a test batch


def module_of(name: str, k: int) -> int:
    """The module a state_dict entry belongs to: its own block, head and decoder, the classifier
    (the last module), and the context encoders of cut c (trained by module c+1's loss)."""
    part, index = (name.split(".") + [""])[:2]
    if part in ("blocks", "heads", "decoders"):
        return int(index)
    if part == "classifier":
        return k - 1
    if part == "context":
        return int(index) + 1
    raise ValueError(f"no module owns '{name}'")


def stage_needs(net: ContSupNet, bounds: list[int], rank: int) -> set:
    """What stage `rank` needs from upstream: 'h' (the previous module's output), 'y', 'x'
    (the image encoders, or module 0's input as context), 'image' (a decoder's target) and
    ('in', m): the input of an earlier module m > 0 as residual context."""
    a, b = bounds[rank], bounds[rank + 1]
    needs = {"y"}
    if a > 0:
        needs.add("h")
    for k in range(max(a, 1), b):   # the cut k-1 feeds module k
        ctx = net.context[k - 1]
        if ctx.image is not None:
            needs.add("x")
        for m in ctx.sources:
            if m == 0:
                needs.add("x")
            elif m < a:
                needs.add(("in", m))
    if any(net.loss_weights[k][0] for k in range(a, min(b, net.k - 1))):
        needs.add("image")
    return needs


def link_slots(net: ContSupNet, bounds: list[int], rank: int) -> list:
    """The tensors rank sends to rank+1, in order: what rank+1 needs, and what ranks further
    down need from before rank+1's first module (relayed)."""
    first = bounds[rank + 1]
    wanted = set(stage_needs(net, bounds, rank + 1))
    for r in range(rank + 2, len(bounds) - 1):
        wanted |= {s for s in stage_needs(net, bounds, r) if s != "h" and (s[0] != "in" or s[1] < first)}
    named = [s for s in ("h", "y", "x", "image") if s in wanted]
    return named + sorted(s for s in wanted if isinstance(s, tuple))


def slot_sample_bytes(net: ContSupNet, bounds: list[int], rank: int, slot) -> int:
    """The most bytes one sample of `slot` takes on the link rank -> rank+1: the labels as
    int64, a tensor (fp32 at most; bf16 halves it) by its shape recorded at the cut
    (`net.shapes`, batch left out: [C, H, W] or tokens [N, D], for the paper's ResNets and
    wrapped models alike). The image and the reconstruction target are module 0's input."""
    if slot == "y":
        return 8
    module = 0 if slot in ("x", "image") else bounds[rank + 1] if slot == "h" else slot[1]
    return 4 * math.prod(net.shapes[module])   # h is the input of rank+1's first module


# A message is one flat uint8 buffer: a header of int64s, then each tensor's bytes (64-byte
# aligned). Header: kind, epoch, step, batch size, then per slot: present, dtype, ndim,
# shape (4), strides (4). The receiver views its tensors in place, with the sender's strides
# (the memory format decides which kernels run, so it must match for bit-equality).
# The header is written on the buffer's device without a host->device copy: the layouts a
# link sends are few (train or eval, full or last batch), each is made once on the device
# (`layouts`) and copied device to device; epoch and step are written by two scalar fills.
# The receiver knows each message's head from the batch schedule (the same batches every
# epoch), so it reads a header on the host only for the first message of each layout, not
# once a message (Link.recv): on CUDA its host need not wait for every message to arrive.
HEAD, PER_SLOT = 4, 11
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.float64]


def _align(n: int) -> int:
    return -(-n // 64) * 64


def message_bytes(net: ContSupNet, bounds: list[int], rank: int, max_batch: int) -> int:
    slots = link_slots(net, bounds, rank)
    return _align(8 * (HEAD + PER_SLOT * len(slots))) + sum(
        _align(max_batch * slot_sample_bytes(net, bounds, rank, s)) for s in slots)


def pack(buf: torch.Tensor, head: tuple, tensors: list, layouts: dict | None = None):
    """Write header `head` (kind, epoch, step, batch) and `tensors` into the flat buffer.
    `layouts` keeps the header layouts already made on the buffer's device (one per link)."""
    dense, entries = [], []
    for t in tensors:
        if t is not None and not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
            t = t.contiguous()
        dense.append(t)
        entries += [0] * PER_SLOT if t is None else \
            [1, DTYPES.index(t.dtype), t.dim(), *t.shape, *[1] * (4 - t.dim()), *t.stride(), *[1] * (4 - t.dim())]
    kind, epoch, step, batch = head
    key = (kind, batch, *entries)
    layouts = {} if layouts is None else layouts
    if key not in layouts:   # once per layout: the only host->device copy
        layouts[key] = torch.tensor([kind, 0, 0, batch, *entries], dtype=torch.int64, device=buf.device)
    header = buf[:8 * len(layouts[key])].view(torch.int64)
    header.copy_(layouts[key])
    header[1].fill_(epoch)
    header[2].fill_(step)
    offset = _align(8 * len(header))
    for t in dense:
        if t is None:
            continue
        n = t.numel() * t.element_size()
        assert offset + n <= buf.numel(), "message larger than its buffer"
        # the storage behind a dense tensor, in memory order, whatever its strides
        buf[offset:offset + n].view(t.dtype).copy_(t.as_strided((t.numel(),), (1,)))
        offset += _align(n)


def header_of(buf: torch.Tensor, slots: int) -> torch.Tensor:
    """The int64 header of the message in `buf`, on the buffer's device."""
    return buf[:8 * (HEAD + PER_SLOT * slots)].view(torch.int64)


def unpack(buf: torch.Tensor, slots: int) -> tuple[tuple, list]:
    """(head, tensors) of a message: views into `buf`, valid until the buffer is reused. The
    header is read on the host (on CUDA a device->host read, which waits for the message):
    a receiver that knows the message's layout uses `views` instead (Link.recv)."""
    header = header_of(buf, slots).tolist()
    return tuple(header[:HEAD]), views(buf, header, slots)


def views(buf: torch.Tensor, header: list[int], slots: int) -> list:
    """The tensors of the message in `buf` laid out as `header` (a message's header read on
    the host) says: views into `buf`, nothing read from it."""
    offset, tensors = _align(8 * len(header)), []
    for i in range(slots):
        present, dtype, ndim, *rest = header[HEAD + PER_SLOT * i:HEAD + PER_SLOT * (i + 1)]
        if not present:
            tensors.append(None)
            continue
        dtype, shape, strides = DTYPES[dtype], rest[:ndim], rest[4:4 + ndim]
        numel = 1
        for s in shape:
            numel *= s
        n = numel * dtype.itemsize
        tensors.append(torch.as_strided(buf[offset:offset + n].view(dtype), shape, strides))
        offset += _align(n)
    return tensors




# Links: a ring of D flat buffers per link, so that packing, sending and the receiver's
# compute overlap. The sender reuses a buffer once its previous send completed (at most D
# sends in flight); the receiver keeps D-1 receives posted ahead of the message it is
# working on, so the next batches arrive while it computes.
class Link:
    def __init__(self, peer: int, nbytes: int, slots: int, device, depth: int, watch):
        self.peer, self.slots, self.watch = peer, slots, watch
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(depth)]
        self.layouts = {}        # header layouts made on the device (pack)
        self.known = {}          # (kind, batch) -> (header read on the host, its copy on the device) (recv)
        self.mismatch = torch.zeros((), dtype=torch.bool, device=device)   # a message unlike its layout's first
        self.pending = deque()   # (buffer index, work) in message order
        self.count = 0           # messages sent or receives posted so far
        watch.links.append(self)

    # sending side
    def send(self, head: tuple, tensors: list):
        if len(self.pending) == len(self.buffers):
            self.watch.wait(self.pending.popleft()[1], self.peer, "sending to")
        i = self.count % len(self.buffers)
        pack(self.buffers[i], head, tensors, self.layouts)
        self.pending.append((i, self.watch.call(dist.isend, self.buffers[i], self.peer)))
        self.count += 1

    def flush(self):
        while self.pending:
            self.watch.wait(self.pending.popleft()[1], self.peer, "sending to")

    # receiving side: `expect(n)` announces n more messages; `recv` returns the next one,
    # viewed in its buffer, which is reused (for a receive posted ahead) at the next call
    def expect(self, n: int):
        self.expected = n

    def recv(self, head: tuple | None = None) -> tuple[tuple, list]:
        """(head, tensors) of the next message. With `head` (kind, epoch, step, batch), which
        the receiver knows from the batch schedule, only the first message of each (kind,
        batch) has its header read on the host (`_known_layout`): on CUDA the host then runs
        ahead instead of waiting for every message. Without it, every header is read."""
        while self.expected and len(self.pending) < len(self.buffers):   # all buffers are free now
            i = self.count % len(self.buffers)
            self.pending.append((i, self.watch.call(dist.irecv, self.buffers[i], self.peer)))
            self.count += 1
            self.expected -= 1
        i, work = self.pending.popleft()
        with self.watch.waiting(self.peer, "receiving from"):   # on gloo the host waits here
            self.watch.wait(work, self.peer, "receiving from")
            if head is None:
                return unpack(self.buffers[i], self.slots)
            return head, views(self.buffers[i], self._known_layout(self.buffers[i], head), self.slots)

    def _known_layout(self, buf: torch.Tensor, head: tuple) -> list[int]:
        """The layout of the message in `buf`, whose head the receiver knows: read on the host
        from the first message of its (kind, batch) on this link (at most four for a run:
        train and test, full and last batch), then taken as known. Each message's header is
        still compared with it, on the device (`mismatch`, read once an epoch: check_layouts)."""
        header = header_of(buf, self.slots)
        kind, epoch, step, batch = head
        if (kind, batch) not in self.known:
            layout = header.tolist()
            if tuple(layout[:HEAD]) != tuple(head):
                raise RuntimeError(f"rank {self.peer} sent {tuple(layout[:HEAD])} where the batch schedule says {head}")
            self.known[(kind, batch)] = (layout, header.clone())
        layout, expected = self.known[(kind, batch)]
        expected[1].fill_(epoch)
        expected[2].fill_(step)
        self.mismatch |= (header != expected).any()
        return layout

    def check_layouts(self):
        """Raise if a message since the last check was not laid out as the first of its kind
        and batch size said (one host read)."""
        if bool(self.mismatch):
            raise RuntimeError(f"a message from rank {self.peer} did not match the layout of the first of its "
                               f"kind and batch size")

    def waiting_on(self) -> int | None:
        """The peer, if a message of this link is not through yet (for the watchdog)."""
        try:
            return self.peer if any(not work.is_completed() for _, work in list(self.pending)) else None
        except Exception:   # the main thread changed the queue meanwhile
            return None
