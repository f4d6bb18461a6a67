"""The optimized context paths (lean default, fused, channels_last) compute the same
function as the plain autograd reference: outputs, every parameter gradient and the BN
running statistics (float64, small batch, CPU)."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from contsup.model import ContSupNet, ImageEncoder, ModelConfig, ResidualEncoder
from contsup.speed.encoders import set_context_impl
from contsup.step import local_learning_step


def _batch(n=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def _assert_same(net, ref, out, out_ref, tol=1e-10):
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=name)
    for (name, a), (_, b) in zip(net.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("mode", ["R0", "E", "R1E", "R2"])
@pytest.mark.parametrize("impl,channels_last", [("fused", False), ("lean", False), ("fused", True),
                                                ("lean", True)])
def test_optimized_step_matches_plain_reference(mode, impl, channels_last, monkeypatch):
    import contsup.speed.encoders
    monkeypatch.setattr(contsup.speed.encoders, "MIN_CHUNK_BYTES", 1)  # lean in several slices even at n=8
    torch.manual_seed(0)
    base = ContSupNet(ModelConfig(arch="resnet32", k=4, mode=mode, dataset="cifar10")).double()
    x, y = _batch()
    ref = set_context_impl(copy.deepcopy(base), "plain")
    out_ref, losses_ref = local_learning_step(ref, x, y)
    net = set_context_impl(copy.deepcopy(base), impl)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    out, losses = local_learning_step(net, x, y)
    torch.testing.assert_close(losses, losses_ref, rtol=1e-10, atol=1e-10)
    _assert_same(net, ref, out, out_ref)
    # a second step with the updated running stats still agrees
    out_ref2, _ = local_learning_step(ref, x.contiguous(), y)
    out2, _ = local_learning_step(net, x, y)
    _assert_same(net, ref, out2, out_ref2)


@pytest.mark.parametrize("make", [lambda: ImageEncoder(64, 8), lambda: ImageEncoder(16, 32),
                                  lambda: ResidualEncoder(16, 32, 16), lambda: ResidualEncoder(32, 64, 8)])
@pytest.mark.parametrize("impl,min_chunk_bytes", [("fused", None), ("lean", 1), ("lean", 1 << 40)])
def test_encoder_float32_and_input_gradient(make, impl, min_chunk_bytes, monkeypatch):
    import contsup.speed.encoders
    if min_chunk_bytes:  # lean's last conv in 8 slices of the batch, or in one
        monkeypatch.setattr(contsup.speed.encoders, "MIN_CHUNK_BYTES", min_chunk_bytes)
    torch.manual_seed(0)
    enc = make()
    c_in = enc.net[0][0].in_channels
    side = 32 if c_in in (3, 16) else 16
    x = torch.randn(10, c_in, side, side, requires_grad=True)
    ref = copy.deepcopy(enc)
    set_context_impl(enc, impl)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = enc(x), ref(x_ref)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for p, q in zip(enc.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * q.grad.abs().max().item())
    for a, b in zip(enc.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _encoder_matches_plain(enc, x, impl):
    """enc with `impl`, channels-last as the trainer runs it, against its plain copy in float64:
    output, every gradient (the input's where it has one), BN's running statistics."""
    enc = enc.double()
    ref = copy.deepcopy(enc)
    set_context_impl(enc, impl)
    enc = enc.to(memory_format=torch.channels_last)
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(x.requires_grad)
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    out, out_ref = enc(x), ref(x_ref)
    g = torch.randn_like(out_ref)
    out.backward(g), out_ref.backward(g)
    if x.requires_grad:
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    _assert_same(enc, ref, out, out_ref)


@pytest.mark.parametrize("channels", [12, 16, 40, 64])
def test_channel_statistics_are_the_batch_mean_and_variance(channels):
    """Both forms of BN's batch statistics (the CPU kernel on row views; sums over batch
    slices elsewhere) against torch.var_mean in float64, channels-last and NCHW."""
    from contsup.speed.encoders import _channel_stats, _sliced_stats
    z = torch.randn(4, channels, 8, 8, dtype=torch.float64) * 3 + 7   # 256 pixels: rows of r = 16, 4, 8, 1
    var, mean = torch.var_mean(z, (0, 2, 3), correction=0)
    for t in (z, z.contiguous(memory_format=torch.channels_last)):
        for m, v in (_channel_stats(t), _sliced_stats(t, slices=2)):
            torch.testing.assert_close(m, mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(v, var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("widen", [1, 4 / 3, 2, 16 / 3], ids=["hidden12", "hidden16", "hidden24", "hidden64"])
@pytest.mark.parametrize("batch,size,side", [(6, 8, 4), (1, 3, 3)], ids=["rows", "no-rows"])
@pytest.mark.parametrize("impl", ["lean", "fused"])
def test_bn_on_rows_of_channels_last_maps_matches_plain(widen, batch, size, side, impl):
    """BN's statistics and weight/bias reductions run on a row view of a channels-last map (rows
    a multiple of 64 values: r pixels of 12, 16, 24 or 64 channels, and 40 in the last layer),
    or, where the pixels are no multiple of r (1 x 3 x 3 = 9), on the map itself."""
    torch.manual_seed(0)
    _encoder_matches_plain(ImageEncoder(40, side, widen), torch.randn(batch, 3, size, size, dtype=torch.float64), impl)


@pytest.mark.parametrize("c_in,c_out,size,side", [(8, 16, 4, 4), (8, 16, 8, 4), (8, 16, 12, 4), (8, 16, 10, 4),
                                                  (32, 4, 4, 1)],
                         ids=["unpooled", "pool2", "pool3", "adaptive", "pool4-moments-again"])
@pytest.mark.parametrize("input_grad", [False, True], ids=["detached", "input-grad"])
@pytest.mark.parametrize("impl,min_chunk_bytes", [("fused", None), ("lean", 1), ("lean", 1 << 40)],
                         ids=["fused", "lean-slices", "lean-one-slice"])
def test_residual_encoder_paths_match_plain(c_in, c_out, size, side, input_grad, impl, min_chunk_bytes, monkeypatch):
    """A residual encoder's input is detached: lean's 1x1 layer then takes its one-pass backward
    (its weight gradient from the input's moments, kept by the forward unless they are larger
    than the pooled masks they replace); with an input gradient, the recompute path. Every
    pool: none, 2x2 and 3x3 blocks (the ReLU backward broadcast over them), adaptive."""
    import contsup.speed.encoders as encoders
    if min_chunk_bytes:
        monkeypatch.setattr(encoders, "MIN_CHUNK_BYTES", min_chunk_bytes)
    one_pass = []
    backward = encoders._pointwise_backward
    monkeypatch.setattr(encoders, "_pointwise_backward",
                        lambda ctx, last, h, g, moments: one_pass.append(moments[0] is not None) or
                        backward(ctx, last, h, g, moments))
    torch.manual_seed(0)
    x = torch.randn(6, c_in, size, size, dtype=torch.float64).requires_grad_(input_grad)
    _encoder_matches_plain(ResidualEncoder(c_in, c_out, side), x, impl)
    kept = size != side and c_in != 32   # the moments are kept where the masks would be larger
    assert one_pass == ([kept] if impl == "lean" and not input_grad else [])


def test_pointwise_encoder_statistics_survive_a_large_input_mean():
    """lean takes a 1x1 encoder's BN statistics from its input's covariance, computed
    centred: an input far from zero (mean 50, std 0.1) still gives BatchNorm's numbers."""
    torch.manual_seed(0)
    enc = ResidualEncoder(16, 32, 8)
    ref = copy.deepcopy(enc)
    set_context_impl(enc, "lean")
    h = torch.randn(12, 16, 16, 16) * 0.1 + 50
    torch.testing.assert_close(enc(h), ref(h), rtol=1e-4, atol=1e-4)
    for a, b in zip(enc.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_eval_and_no_grad_use_the_plain_path():
    torch.manual_seed(0)
    net = ContSupNet(ModelConfig(arch="resnet32", k=4, mode="R1E", dataset="cifar10"))
    ref = copy.deepcopy(net)
    set_context_impl(net, "lean")
    x, _ = _batch(4, torch.float32)
    net.eval(), ref.eval()
    torch.testing.assert_close(net(x), ref(x))


def test_unknown_impl_is_a_usage_error():
    from contsup.errors import UsageError
    with pytest.raises(UsageError, match="lean, fused, plain"):
        set_context_impl(ContSupNet(ModelConfig(k=2, mode="R0", dataset="cifar10")), "fast")


def test_the_model_builds_plain_encoders_and_the_trainer_runs_lean_by_default():
    from contsup.speed.encoders import EncoderChain
    from contsup.speed.setup import prepare_model
    from contsup.train import TrainConfig
    net = ContSupNet(ModelConfig(k=4, mode="R1E", dataset="cifar10"))
    encoders = [m for m in net.modules() if isinstance(m, (ImageEncoder, ResidualEncoder))]
    assert encoders and not any(isinstance(m.net, EncoderChain) for m in encoders)
    keys = list(net.state_dict())
    cfg = TrainConfig(k=4, mode="R1E", dataset="cifar10")
    assert cfg.context_impl == "auto"
    prepare_model(net, cfg, torch.device("cpu"))   # auto: lean on a CPU
    assert all(isinstance(m.net, EncoderChain) and m.net.lean for m in encoders)
    assert list(net.state_dict()) == keys   # the swap keeps every state_dict key


def test_auto_context_impl_resolves_per_device_and_is_recorded():
    from contsup.speed.encoders import resolve_context_impl
    from contsup.rundir import config_diff
    from contsup.speed.setup import resolved_for
    from contsup.train import TrainConfig
    assert [resolve_context_impl("auto", d) for d in ("cpu", torch.device("cuda", 1), "mps")] == ["lean", "plain",
                                                                                                   "plain"]
    assert resolve_context_impl("fused", "cuda") == "fused" and resolve_context_impl("fused", "cpu") == "fused"
    assert resolve_context_impl("lean", "cpu", compiled=True) == "plain"   # compile_model runs plain
    # --deterministic on CUDA: plain's adaptive-pool backward has no deterministic kernel there
    assert resolve_context_impl("auto", "cuda", deterministic=True) == "fused"
    assert resolve_context_impl("auto", "cpu", deterministic=True) == "lean"
    cfg = TrainConfig(dataset="digits8", k=4, mode="R1E")
    ran = resolved_for(cfg, torch.device("cpu"))
    assert (cfg.context_impl, ran.context_impl) == ("auto", "lean")
    assert config_diff(cfg, vars(ran)) == []   # a run resumed with auto (elsewhere) is the same run


def test_flop_count_sanity():
    x, y = _batch(2, torch.float32)

    def flops(mode, k=4):
        net = ContSupNet(ModelConfig(arch="resnet32", k=k, mode=mode, dataset="cifar10"))
        with FlopCounterMode(display=False) as fc:
            local_learning_step(net, x, y)
        return fc.get_total_flops()

    r0, r1e, e2e = flops("R0"), flops("R1E"), flops("R0", k=1)
    assert r1e > r0 > e2e > 0


# --------------------------------------------------------------------------------------
# Speed options of the trainer (channels_last, bf16 autocast, torch.compile)
def _digits_cfg(out, **kw):
    from contsup.train import TrainConfig
    return TrainConfig(**{"dataset": "digits8", "arch": "resnet32", "k": 4, "mode": "R1E", "epochs": 2,
                          "warmup_epochs": 0, "batch_size": 64, "lr": 0.05, "train_subset": 256,
                          "out_dir": str(out), "device": "cpu", **kw})


def test_channels_last_trains_the_same_run(tmp_path):
    """NHWC reorders the float sums only: the same losses and test error to rounding. (Over
    many steps rounding differences grow chaotically, so one epoch of 4 steps is compared.)"""
    import json

    from contsup.train import train
    rows = {}
    for cl in (False, True):
        train(_digits_cfg(tmp_path / f"cl{cl}", channels_last=cl, epochs=1), progress=False)
        rows[cl] = json.loads((tmp_path / f"cl{cl}" / "metrics.jsonl").read_text())
    torch.testing.assert_close(torch.tensor(rows[True]["local_losses"]), torch.tensor(rows[False]["local_losses"]),
                               rtol=1e-4, atol=1e-5)
    assert abs(rows[True]["test_error"] - rows[False]["test_error"]) <= 0.4  # one of 500 digits may flip
    nhwc = torch.load(tmp_path / "clTrue" / "ckpt.pt", weights_only=True)["model"]
    assert nhwc["blocks.1.0.conv1.weight"].is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_runs_convs_in_bf16_and_keeps_fp32_gradients():
    torch.manual_seed(0)
    base = ContSupNet(ModelConfig(arch="resnet32", k=4, mode="R1E", dataset="cifar10"))
    x, y = _batch(16, torch.float32)
    ref, net = copy.deepcopy(base), copy.deepcopy(base)
    _, losses_ref = local_learning_step(ref, x, y)
    dtypes = set()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    _, losses = local_learning_step(net, x, y, bf16=True)
    assert dtypes == {torch.bfloat16}
    torch.testing.assert_close(losses, losses_ref, rtol=0.05, atol=0.02)
    g = torch.cat([p.grad.flatten() for p in net.parameters()])
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0) > 0.95


def test_compile_model_compiles_every_part_in_place():
    from contsup.speed.setup import compile_model, prepare_model
    from contsup.train import TrainConfig
    cfg = TrainConfig(dataset="digits8", k=2, mode="R1E", torch_compile=True)
    net = ContSupNet(cfg.model_config())
    keys = list(net.state_dict())
    net = compile_model(prepare_model(net, cfg, torch.device("cpu")))
    parts = [*net.blocks, *net.heads, net.classifier, *net.context]
    assert all(p._compiled_call_impl is not None for p in parts)
    assert list(net.state_dict()) == keys  # checkpoints stay loadable without compile
    assert net.blocks[0][0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_compiled_context_supply_matches_eager():
    """One ContextSupply (image + residual encoder), compiled by inductor on CPU (~30 s)."""
    from contsup.model import ContextSupply, parse_mode
    torch.manual_seed(0)
    eager = ContextSupply(1, parse_mode("R1E", 4), [(3, 8, 8), (16, 8, 8), (32, 4, 4)])
    set_context_impl(eager, "plain")
    compiled = copy.deepcopy(eager)
    compiled.compile()
    x, h = torch.randn(6, 3, 8, 8), torch.randn(6, 16, 8, 8)
    out, out_ref = compiled(x, (h,)), eager(x, (h,))
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    for (name, p), (_, q) in zip(compiled.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("size,side", [(32, 32), (32, 8), (16, 8), (9, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_to_is_adaptive_avg_pool(size, side, channels_last):
    from contsup.speed.encoders import pool_to, pool_to_backward
    h = torch.randn(3, 5, size, size, dtype=torch.float64)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    a, b = h.clone().requires_grad_(), h.clone().requires_grad_()
    out, ref = pool_to(a, side), torch.nn.AdaptiveAvgPool2d(side)(b)
    g = torch.randn_like(ref)
    out.backward(g), ref.backward(g)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(pool_to_backward(g, h), b.grad, rtol=0, atol=1e-12)


def test_trainer_turns_on_memory_reuse_on_cpu_unless_told_not_to(tmp_path, monkeypatch):
    import contsup.train
    from contsup.train import train
    calls = []
    monkeypatch.setattr(contsup.train, "reuse_freed_cpu_memory", lambda: calls.append("on") or True)
    train(_digits_cfg(tmp_path / "default", epochs=1, train_subset=64), progress=False)
    train(_digits_cfg(tmp_path / "off", epochs=1, train_subset=64, reuse_cpu_memory=False), progress=False)
    assert calls == ["on"]


_FAULTS_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from contsup.speed.memory import reuse_freed_cpu_memory

def faults():  # minor page faults of allocating, filling and freeing 64 MB twenty times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(2 ** 24).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
default = faults()
reused = reuse_freed_cpu_memory()
faults()
print(default, reused, faults())
"""


def test_reuse_freed_cpu_memory_stops_refaulting_large_blocks():
    """glibc unmaps a freed 64 MB block, so the next one faults its pages in again; after
    reuse_freed_cpu_memory the block is kept and reused. (A subprocess: the setting is process-wide.)"""
    import platform
    import subprocess
    import sys
    from pathlib import Path
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's; elsewhere reuse_freed_cpu_memory returns False and does nothing")
    script = _FAULTS_SCRIPT.format(root=str(Path(__file__).resolve().parents[1]))
    default, reused, after = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                            check=True).stdout.split()
    assert reused == "True"
    assert int(default) > 1000            # 20 x 64 MB of fresh pages (fewer with transparent huge pages)
    assert int(after) * 4 < int(default)  # the freed block is reused: no new pages (once in a while one block)
