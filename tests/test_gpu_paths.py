"""GPU paths of issue 22 point 9, checked without a GPU (stubs of torch.cuda): a single
process on cuda:N makes it the current device; a PyTorch whose CUDA build needs a newer
driver is named as such, not as "no CUDA GPU"."""
import pytest
import torch

import contsup.train as train_module
from contsup.errors import UsageError
from contsup.speed import setup
from contsup.train import TrainConfig


class Reached(Exception):
    """The run got past its device set-up (the test stops it there)."""


@pytest.fixture
def two_fake_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))

    def stop(cfg, device, ckpt, data=True):
        calls.append(("set_up_run", device))
        raise Reached
    monkeypatch.setattr(train_module, "set_up_run", stop)
    return calls


@pytest.mark.parametrize("name, calls", [("cuda:1", [torch.device("cuda", 1)]), ("cuda", []), ("cpu", [])])
def test_a_single_process_on_cuda_n_makes_it_the_current_device(tmp_path, two_fake_gpus, name, calls):
    cfg = TrainConfig(dataset="digits8", k=2, epochs=1, out_dir=str(tmp_path / "run"), device=name)
    with pytest.raises(Reached):
        train_module.train(cfg, progress=False)
    # before anything is built on the device (pinned copies, the model, the data)
    assert two_fake_gpus == calls + [("set_up_run", torch.device(name))]


TOO_OLD = ("The NVIDIA driver on your system is too old (found version 12080). Please update your GPU driver by "
           "downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx "
           "Alternatively, go to: https://pytorch.org to install a PyTorch version that has been compiled with "
           "your version of the CUDA driver.")
NO_DRIVER = ("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a "
             "driver from http://www.nvidia.com/Download/index.aspx")


@pytest.fixture
def cuda_init_fails(monkeypatch):
    def fail_with(message, cuda="13.0"):
        def init():
            raise RuntimeError(message)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "init", init)
        monkeypatch.setattr(torch.version, "cuda", cuda)
        setup.cuda_unusable_reason.cache_clear()
        setup._note_unusable_driver.cache_clear()
    yield fail_with
    setup.cuda_unusable_reason.cache_clear()
    setup._note_unusable_driver.cache_clear()


def test_a_driver_too_old_for_this_pytorch_is_named(cuda_init_fails):
    cuda_init_fails(TOO_OLD)
    with pytest.raises(UsageError) as e:
        setup.pick_device("cuda:0")
    assert str(e.value) == ("--device cuda asked for, but this PyTorch's CUDA 13.0 build needs a newer NVIDIA "
                            "driver than the installed one (it supports CUDA 12.8): update the driver or install "
                            "a PyTorch built for its CUDA; use --device cpu or auto")


@pytest.mark.parametrize("message, cuda, reason", [(NO_DRIVER, "13.0", "no CUDA GPU is visible"),
                                                   ("No CUDA GPUs are available", "12.8", "no CUDA GPU is visible"),
                                                   ("", None, "this PyTorch is built without CUDA")])
def test_no_gpu_is_still_no_gpu(cuda_init_fails, message, cuda, reason):
    cuda_init_fails(message, cuda)
    with pytest.raises(UsageError, match=f"^--device cuda asked for, but {reason}; use --device cpu or auto$"):
        setup.pick_device("cuda")


def test_auto_says_once_that_it_falls_back_to_the_cpu_for_the_driver(cuda_init_fails, capsys):
    cuda_init_fails(TOO_OLD)
    assert setup.pick_device("auto") == setup.pick_device("auto") == torch.device("cpu")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("contsup: warning: --device auto trains on the CPU: this "
                                                   "PyTorch's CUDA 13.0 build needs a newer NVIDIA driver"), err
    cuda_init_fails(NO_DRIVER)   # a machine without a GPU: auto is the CPU, nothing to say
    assert setup.pick_device("auto") == torch.device("cpu") and capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------
# A receiving pipeline rank reads a header on the host once per layout, not once a message
from contextlib import contextmanager  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from contsup.pipeline import messages  # noqa: E402
from contsup.pipeline.run import batch_sizes  # noqa: E402


class HostReads(TorchDispatchMode):
    """Counts the host reads of tensors: aten._local_scalar_dense (.item(), bool(), int())
    and .tolist() (patched in by the test: on a CPU tensor it reads without dispatching)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class Wire:
    """Stands in for the process group and the watchdog of a Link: a posted receive gets the
    next message the test queued (the bytes another rank's `pack` wrote)."""

    def __init__(self):
        self.links, self.queue = [], []

    def call(self, fn, buf, peer, **kwargs):
        assert fn is torch.distributed.irecv
        buf.copy_(self.queue.pop(0))
        return self

    def wait(self, work, peer, doing):
        pass

    @contextmanager
    def waiting(self, peer, doing, seconds=None):
        yield


SLOTS = 3   # h (channels_last), y, the decoders' image (training batches only)
TRAIN_SIZES, EVAL_SIZES = [4, 4, 2], [5, 1]   # a last smaller batch of each kind


def batch(kind, n, dtype=torch.float32):
    h = torch.randn(n, 3, 2, 2).to(dtype).contiguous(memory_format=torch.channels_last)
    return [h, torch.arange(n), torch.rand(n, 1, 2, 2) if kind == messages.TRAIN else None]


def schedule(epoch):
    heads = [(messages.TRAIN, epoch, s, n) for s, n in enumerate(TRAIN_SIZES)]
    return heads + [(messages.EVAL, epoch, s, n) for s, n in enumerate(EVAL_SIZES)]


@pytest.fixture
def link(monkeypatch):
    reads = HostReads()
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        reads.reads += 1
        return real_tolist(self)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    wire = Wire()
    receiver = messages.Link(0, 4096, SLOTS, "cpu", 2, wire)

    def send(head, tensors):
        buf = torch.zeros(4096, dtype=torch.uint8)
        messages.pack(buf, head, tensors)
        wire.queue.append(buf)
    return receiver, send, reads


def test_a_receiver_reads_one_header_per_layout_not_one_per_message(link):
    receiver, send, reads = link
    counts = []
    for epoch in (0, 1):
        heads = schedule(epoch)
        sent = [batch(head[0], head[3]) for head in heads]
        for head, tensors in zip(heads, sent):
            send(head, tensors)
        receiver.expect(len(heads))
        got = []
        with reads:
            for head in heads:   # a message's views are valid until its buffer is reused: copied at once
                head, tensors = receiver.recv(head)
                got.append((head, [t if t is None else torch.empty_like(t).copy_(t) for t in tensors]))
            receiver.check_layouts()   # the epoch's end: one read for the whole epoch
        counts.append(reads.reads)
        reads.reads = 0
        for (head, tensors), head_sent, tensors_sent in zip(got, heads, sent):
            assert head == head_sent
            for a, b in zip(tensors, tensors_sent):
                assert (a is None and b is None) or (torch.equal(a, b) and a.stride() == b.stride()
                                                     and a.dtype == b.dtype)
    # epoch 0: the four layouts (train and test, full and last batch) and the check; then the check only
    assert counts == [4 + 1, 1]


def test_without_the_schedule_every_message_is_read(link):
    receiver, send, reads = link
    heads = schedule(0)
    for head in heads:
        send(head, batch(head[0], head[3]))
    receiver.expect(len(heads))
    with reads:
        assert [receiver.recv()[0] for _ in heads] == heads
    assert reads.reads == len(heads)


def test_a_message_unlike_its_layout_is_caught_at_the_epochs_end(link):
    receiver, send, reads = link
    head = (messages.TRAIN, 0, 0, 4)
    send(head, batch(messages.TRAIN, 4))
    send((messages.TRAIN, 0, 1, 4), batch(messages.TRAIN, 4, torch.bfloat16))   # another dtype, same size
    receiver.expect(2)
    receiver.recv(head)
    receiver.check_layouts()
    receiver.recv((messages.TRAIN, 0, 1, 4))
    with pytest.raises(RuntimeError, match="did not match the layout of the first of its kind and batch size"):
        receiver.check_layouts()


def test_a_first_message_off_the_schedule_is_refused(link):
    receiver, send, _ = link
    send((messages.TRAIN, 0, 0, 3), batch(messages.TRAIN, 3))
    receiver.expect(1)
    with pytest.raises(RuntimeError, match=r"rank 0 sent \(0, 0, 0, 3\) where the batch schedule says \(0, 0, 0, 4\)"):
        receiver.recv((messages.TRAIN, 0, 0, 4))


def test_the_schedule_is_the_loaders_batch_sizes():
    from contsup import tables
    from contsup.data import DeviceLoader
    images, labels = torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64)
    recipe = tables.DATA_RECIPES["digits8"]
    for b, drop_last in ((4, False), (4, True), (5, False), (16, False)):
        loader = DeviceLoader(images, labels, recipe, b, train=False, device="cpu", drop_last=drop_last)
        assert batch_sizes(loader) == [len(y) for _, y in loader]
