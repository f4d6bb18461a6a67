"""The CUDA paths, checked without a GPU: no host read and no host->device copy per training
step (on fake CUDA tensors), --deterministic sets what it says, and the CUDA peak memory
counts the gradients. The checks that need a real GPU are at the end (skipped here)."""
import json
from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import contsup.epoch as epoch_module
import contsup.rundir as rundir
import contsup.train as train_module
from contsup.speed import setup
from contsup import tables
from contsup.data import DeviceLoader
from contsup.model import ContSupNet
from contsup.speed import memory
from contsup.step import local_learning_step
from contsup.train import TrainConfig
from contsup.wrap import build_net

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class HostTraffic(TorchDispatchMode):
    """Logs, in order, every host read ("read": aten._local_scalar_dense, what .item(),
    bool() and int() of a device tensor do), every host->device copy ("h2d") and every
    tensor made from host data ("host data": torch.tensor(...), a copy on CUDA), plus
    "STEP" markers the test adds. A fake tensor has no value to read: a read answers True
    (a bool) or 0, which tells the trainer that every loss was finite."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.log.append("read")
            if isinstance(args[0], torch._subclasses.fake_tensor.FakeTensor):
                return True if args[0].dtype == torch.bool else 0
        elif func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" \
                and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.log.append("h2d")
        elif func is torch.ops.aten.copy_.default and args[1].device.type == "cpu" and args[0].device.type != "cpu":
            self.log.append("h2d")
        elif func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
            self.log.append("host data")
        return func(*args, **kwargs)

    def per_step(self):
        """(Counter of the epoch's set-up, [Counter of each step: from its start to the next
        step's, the last one to the end])."""
        marks = [i for i, e in enumerate(self.log) if e == "STEP"] + [len(self.log)]
        return Counter(self.log[:marks[0]]), [Counter(self.log[a + 1:b]) for a, b in zip(marks, marks[1:])]


def to_fake_cuda(net, mode):
    """net's parameters and buffers as fake CUDA tensors (in place; Module.to cannot swap a
    fake parameter that the mode holds a weak reference to)."""
    for module in net.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(mode.from_tensor(p).to("cuda"), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = mode.from_tensor(b).to("cuda")
    return net


@pytest.fixture
def fake_cuda_epoch(tmp_path, monkeypatch):
    """run(check_every) -> HostTraffic of one training epoch (4 steps of 32 CIFAR-shaped
    images, with --reconstruct: every data path) and then one evaluation (4 batches), run by
    the trainer's own train_epoch and evaluate on fake CUDA tensors. The autograd engine
    asks the CUDA runtime for its streams, which a machine without a GPU lacks, so here
    backward() gives the parameters zero gradients instead (the real backward's ops are
    checked on the CPU by test_the_step_reads_nothing_from_the_host)."""
    def run(check_every: int, **model) -> HostTraffic:
        model = {"arch": "resnet32", "reconstruct": True} | model   # any other arch: built by contsup.wrap
        cfg = TrainConfig(dataset="cifar10", k=4, mode="R1E", batch_size=32, out_dir=str(tmp_path / "run"),
                          device="cpu", check_every=check_every, **model)
        net = setup.prepare_model(build_net(cfg.model_config()), cfg, torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
        traffic = HostTraffic()
        real_step = train_module.local_learning_step

        def marked_step(*args, **kwargs):
            traffic.log.append("STEP")
            return real_step(*args, **kwargs)

        def zero_gradients(loss, *args, **kwargs):
            for p in net.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

        monkeypatch.setattr(train_module, "local_learning_step", marked_step)
        monkeypatch.setattr(torch.Tensor, "backward", zero_gradients)
        recipe = tables.DATA_RECIPES["cifar10"]
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            to_fake_cuda(net, mode)
            train_loader = DeviceLoader(x, y, recipe, 32, train=True, device="cuda", generator=gen)
            test_loader = DeviceLoader(x, y, recipe, 32, train=False, device="cuda")
            assert next(net.parameters()).device.type == train_loader.images.device.type == "cuda"
            optimizer = train_module.make_optimizer(net, cfg)
            with traffic:
                seen, wrong, loss_sum = train_module.train_epoch(net, train_loader, optimizer, cfg, 0, 0.1)
                traffic.log.append("EVALUATE")
                train_module.evaluate(net, test_loader, cfg.channels_last)
        assert seen == 128 and wrong.device.type == loss_sum.device.type == "cuda"
        monkeypatch.undo()
        return traffic
    return run


def test_training_steps_neither_read_the_host_nor_copy_to_the_device(fake_cuda_epoch):
    traffic = fake_cuda_epoch(check_every=50)
    evaluation = traffic.log.index("EVALUATE")
    train_log, eval_log = traffic.log[:evaluation], traffic.log[evaluation + 1:]
    traffic.log = train_log
    setup, steps = traffic.per_step()
    # The epoch's set-up: its random numbers go to the device in one copy.
    assert setup == Counter(h2d=1)
    # Steps: nothing, except the divergence check read once, after the last step.
    assert len(steps) == 4 and steps[:3] == [Counter()] * 3 and steps[3] == Counter(read=1)
    # The evaluation of 4 batches reads its error count once.
    assert Counter(eval_log) == Counter(read=1)


@pytest.mark.parametrize("arch", ["torchvision:resnet18", "contsup.backbones:small_vit"])
def test_a_wrapped_models_epoch_on_cuda_reads_the_host_only_at_its_checks(fake_cuda_epoch, arch):
    traffic = fake_cuda_epoch(check_every=50, arch=arch, reconstruct=False)
    traffic.log = traffic.log[:traffic.log.index("EVALUATE")]
    setup, steps = traffic.per_step()
    assert setup == Counter(h2d=1)
    assert len(steps) == 4 and steps[:3] == [Counter()] * 3 and steps[3] == Counter(read=1)


def test_the_divergence_check_is_read_every_n_steps(fake_cuda_epoch):
    traffic = fake_cuda_epoch(check_every=2)
    traffic.log = traffic.log[:traffic.log.index("EVALUATE")]
    _, steps = traffic.per_step()
    assert [c["read"] for c in steps] == [0, 1, 0, 2]  # after steps 1 and 3, and at the epoch's end
    assert all(c["h2d"] == 0 for c in steps)


@pytest.mark.parametrize("mode, loss, reconstruct, impl", [("R1E", "softmax", True, "lean"),
                                                          ("R2", "contrast", False, "fused")])
def test_the_step_reads_nothing_from_the_host(mode, loss, reconstruct, impl):
    """The local-learning step itself, forward and backward with real tensors on the CPU:
    no read of a tensor's value, no tensor made from host data (both syncs on CUDA)."""
    cfg = TrainConfig(dataset="digits8", arch="resnet32", k=4, mode=mode, loss=loss, reconstruct=reconstruct,
                      context_impl=impl, device="cpu")
    net = setup.prepare_model(ContSupNet(cfg.model_config()), cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    image = torch.rand(16, 3, 8, 8, generator=gen) if reconstruct else None
    with HostTraffic() as traffic:
        logits, losses = local_learning_step(net, x.contiguous(memory_format=torch.channels_last), y, image)
    assert traffic.log == [] and torch.isfinite(losses).all() and logits.shape == (16, 10)
    assert all(p.grad is not None for p in net.blocks.parameters())


@pytest.mark.parametrize("arch, mode, impl", [("torchvision:resnet18", "R1E", "lean"),
                                              ("contsup.backbones:cifar_resnet18", "R2E", "fused"),
                                              ("contsup.backbones:small_vit", "R1E", "lean")])
def test_a_wrapped_models_step_reads_nothing_from_the_host(arch, mode, impl):
    """The same for models cut by contsup.wrap (traced pieces, heads and encoders by shape,
    token heads and encoders, the class token's zero context): no host read, no host data."""
    cfg = TrainConfig(dataset="digits", arch=arch, k=4, mode=mode, context_impl=impl, device="cpu")
    net = setup.prepare_model(build_net(cfg.model_config()), cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    with HostTraffic() as traffic:
        logits, losses = local_learning_step(net, x.contiguous(memory_format=torch.channels_last), y)
    assert traffic.log == [] and torch.isfinite(losses).all() and logits.shape == (4, 10)
    assert all(p.grad is not None for p in net.context.parameters())


# --------------------------------------------------------------------------------------
# --deterministic
@pytest.fixture
def restore_determinism(monkeypatch):
    """Put torch's process-wide determinism settings back after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # monkeypatch restores the environment
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def test_deterministic_sets_torch_cudnn_and_cublas(restore_determinism):
    import os
    cfg = TrainConfig(dataset="digits8", k=2, deterministic=True, device="cpu")
    torch.backends.cudnn.benchmark = True
    setup.prepare_model(ContSupNet(cfg.model_config()), cfg, torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    # the next run's config decides: off again
    off = TrainConfig(dataset="digits8", k=2, device="cpu")
    setup.prepare_model(ContSupNet(off.model_config()), off, torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_deterministic_on_cuda_refuses_what_has_no_deterministic_backward():
    from contsup.errors import UsageError
    cuda = torch.device("cuda")   # check_deterministic only reads the config and the model
    make = lambda **kw: TrainConfig(dataset="digits8", k=4, mode="R1E", deterministic=True, **kw)  # noqa: E731
    for cfg, fix in ((make(reconstruct=True), "reconstruct"), (make(context_impl="plain"), "lean"),
                     (make(torch_compile=True), "lean")):
        with pytest.raises(UsageError, match=fix):
            setup.check_deterministic(ContSupNet(cfg.model_config()), cfg, cuda)
    for cfg in (make(), make(context_impl="fused"), TrainConfig(dataset="digits8", k=4, mode="R0",
                                                                deterministic=True, context_impl="plain")):
        setup.check_deterministic(ContSupNet(cfg.model_config()), cfg, cuda)   # accepted
    plain = TrainConfig(dataset="digits8", k=4, mode="R1E", context_impl="plain")       # without the flag: anything
    setup.check_deterministic(ContSupNet(plain.model_config()), plain, cuda)


def test_flags_reach_the_config_and_change_nothing_on_a_cpu(tmp_path, restore_determinism):
    """--deterministic and --check-every from the CLI; on a CPU the run is the same bit for
    bit with and without them, and a resume may switch them."""
    from contsup.cli import main
    common = dict(dataset="digits8", k=2, mode="R1E", epochs=2, warmup_epochs=0, batch_size=16, train_subset=48)
    assert main(["train", "--dataset", "digits8", "-k", "2", "--epochs", "2", "--warmup-epochs", "0",
                 "--batch-size", "16", "--train-subset", "48", "--device", "cpu", "--no-progress",
                 "--deterministic", "--check-every", "2", "--out", str(tmp_path / "flags")]) == 0
    config = json.loads((tmp_path / "flags" / "config.json").read_text())
    assert (config["deterministic"], config["check_every"]) == (True, 2)
    train_module.train(TrainConfig(**common, out_dir=str(tmp_path / "plain"), device="cpu"), progress=False)
    a = torch.load(tmp_path / "flags" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(t, b[name]) for name, t in a.items())
    assert rundir.MAY_CHANGE_ON_RESUME >= {"deterministic", "check_every"}
    assert rundir.config_diff(TrainConfig(**common, deterministic=False, check_every=7, device="cpu"),
                                    config | {"out_dir": "elsewhere"}) == []


# --------------------------------------------------------------------------------------
# The CUDA peak memory counts the gradients the step allocates.
def test_cuda_peak_clears_the_gradients_so_that_the_step_allocates_them(monkeypatch):
    cfg = TrainConfig(dataset="digits8", k=2, mode="R1E", device="cpu")
    net = ContSupNet(cfg.model_config())
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    local_learning_step(net, x, y)          # as measure_step_memory's tracker step: .grad left set
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    calls = []
    allocated = {"now": 1000, "peak": 1000}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset")
                        or allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append("max")
                        or allocated["peak"])

    def step():
        calls.append("step")
        fresh = [p for p in net.parameters() if p.requires_grad and p.grad is None]
        grad_bytes = sum(p.numel() * p.element_size() for p in fresh)
        local_learning_step(net, x, y)
        allocated["peak"] = allocated["now"] + 500 + grad_bytes   # 500 bytes of activations, then the new gradients
        return grad_bytes

    grad_bytes = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    assert memory.cuda_peak_bytes(step, "cuda", net.parameters()) == 500 + grad_bytes
    assert calls == ["synchronize", "reset", "step", "synchronize", "max"]


# --------------------------------------------------------------------------------------
# On a GPU.
@needs_cuda
def test_an_epoch_on_cuda_never_synchronises_outside_its_checks(tmp_path, monkeypatch):
    cfg = TrainConfig(dataset="digits8", arch="resnet32", k=4, mode="R1E", batch_size=32, train_subset=256,
                      out_dir=str(tmp_path / "run"), device="cuda", check_every=3)
    device = torch.device("cuda")
    net = setup.prepare_model(ContSupNet(cfg.model_config()), cfg, device)
    from contsup.data import load_dataset
    data = load_dataset("digits8", train_subset=256)
    loader = DeviceLoader(data.train_x, data.train_y, tables.DATA_RECIPES["digits8"], 32, train=True, device=device,
                          generator=torch.Generator().manual_seed(0))
    optimizer = train_module.make_optimizer(net, cfg)
    train_module.train_epoch(net, loader, optimizer, cfg, 0, 0.05)   # warm-up: cuDNN, allocator, optimizer state
    real_check, checks = epoch_module.DivergenceWatch.check, []

    def allowed_check(self, *args, **kwargs):   # the one sync that is meant
        checks.append(1)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real_check(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(epoch_module.DivergenceWatch, "check", allowed_check)
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_module.train_epoch(net, loader, optimizer, cfg, 1, 0.05)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(checks) == 8 // 3 + 1


@needs_cuda
def test_deterministic_cuda_runs_and_resume_are_bit_for_bit(tmp_path, interrupt_in_second_evaluation,
                                                            restore_determinism):
    cfg = lambda name: TrainConfig(dataset="digits8", arch="resnet32", k=4, mode="R1E", epochs=3,  # noqa: E731
                                   warmup_epochs=1, batch_size=64, lr=0.05, train_subset=256, device="cuda",
                                   deterministic=True, out_dir=str(tmp_path / name))
    train_module.train(cfg("a"), progress=False)
    train_module.train(cfg("b"), progress=False)
    restore = interrupt_in_second_evaluation()
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg("resumed"), progress=False)
    restore()
    train_module.train(cfg("resumed"), resume=True, progress=False)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    for other in ("b", "resumed"):
        b = torch.load(tmp_path / other / "ckpt.pt", weights_only=True)["model"]
        assert all(torch.equal(t, b[name]) for name, t in a.items()), other
