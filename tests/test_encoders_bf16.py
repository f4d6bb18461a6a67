"""The lean and fused context encoders under bfloat16 autocast (train --bf16): they run their
own path, not the plain one, compute what autocast makes of the plain encoders to bf16's
rounding, and keep their memory advantage (CPU autocast stands in for CUDA's)."""
import copy

import pytest
import torch

from contsup.model import ContSupNet, ImageEncoder, ModelConfig, ResidualEncoder
from contsup.speed import encoders
from contsup.speed.encoders import set_context_impl
from contsup.speed.memory import measure_step_memory
from contsup.step import local_learning_step


def _err(a, b):
    """|a - b| / |b| (norms), a in any dtype against b in float32."""
    return ((a.float() - b).norm() / b.norm()).item()


def _bf16_encoder_errors(enc, truth, x, g) -> list[float]:
    """The errors of `enc` under bf16 autocast against `truth` (float32): output, input
    gradient, each parameter's gradient, each buffer."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(xa)
    assert out.dtype == torch.bfloat16
    ref = truth(xb)
    out.backward(g.to(out.dtype))
    ref.backward(g)
    assert all(p.grad.dtype == torch.float32 for p in enc.parameters())
    return ([_err(out, ref), _err(xa.grad, xb.grad)] + [_err(p.grad, q.grad) for p, q in
                                                        zip(enc.parameters(), truth.parameters())]
            + [_err(a, b) for a, b in zip(enc.buffers(), truth.buffers()) if b.is_floating_point()])


@pytest.mark.parametrize("make", [lambda: ImageEncoder(64, 8), lambda: ImageEncoder(16, 32),
                                  lambda: ResidualEncoder(16, 32, 16), lambda: ResidualEncoder(32, 64, 8)])
@pytest.mark.parametrize("impl,min_chunk_bytes", [("fused", None), ("lean", 1), ("lean", 1 << 40)])
def test_encoder_under_bf16_autocast_is_as_close_as_plain(make, impl, min_chunk_bytes, monkeypatch):
    """bf16 rounding alone moves plain's gradients by several % from float32 (BN's backward
    subtracts near-equal sums); lean and fused under bf16 must be as close to the float32
    truth as plain under bf16 is, in the output, every gradient and BN's running stats."""
    if min_chunk_bytes:  # lean's last conv in 8 slices of the batch, or in one
        monkeypatch.setattr(encoders, "MIN_CHUNK_BYTES", min_chunk_bytes)
    calls = []
    apply = encoders._EncoderChainFn.apply
    monkeypatch.setattr(encoders._EncoderChainFn, "apply", lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(0)
    truth = make()
    c_in = truth.net[0][0].in_channels
    side = 32 if c_in in (3, 16) else 16
    x = torch.randn(10, c_in, side, side)
    g = torch.randn_like(truth(x.clone()))
    torch.manual_seed(0)
    truth = make()   # the same weights, fresh running statistics
    plain, ours = copy.deepcopy(truth), set_context_impl(copy.deepcopy(truth), impl)
    errors_plain = _bf16_encoder_errors(plain, copy.deepcopy(truth), x, g)
    assert not calls
    errors = _bf16_encoder_errors(ours, truth, x, g)
    assert calls, "the plain path ran instead"
    assert errors[0] < 0.01                                # the output: bf16's rounding
    for mine, theirs in zip(errors, errors_plain):
        assert mine <= 1.5 * theirs + 0.005, (errors, errors_plain)


@pytest.mark.parametrize("impl", ["lean", "fused"])
def test_step_under_bf16_keeps_the_encoders_memory(impl):
    """A K=4 R1E step under bf16 with lean or fused encoders: losses as plain's under bf16, the
    context encoders' gradients as close to the float32 step's as plain's under bf16 are, at
    less peak activation memory than plain's (the memory tracker). Before, autocast sent
    them down the plain path and all three used the same memory."""
    torch.manual_seed(0)
    base = ContSupNet(ModelConfig(arch="resnet32", k=4, mode="R1E", dataset="cifar10"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    truth, plain = set_context_impl(copy.deepcopy(base), "plain"), set_context_impl(copy.deepcopy(base), "plain")
    ours = set_context_impl(copy.deepcopy(base), impl)
    local_learning_step(truth, x, y)
    _, losses_plain = local_learning_step(plain, x, y, bf16=True)
    _, losses = local_learning_step(ours, x, y, bf16=True)
    torch.testing.assert_close(losses, losses_plain, rtol=0.02, atol=0.02)
    def context_grads(net):   # one vector (a single small parameter's error is noise)
        return torch.cat([p.grad.flatten() for name, p in net.named_parameters()
                          if name.startswith("context") and p.grad is not None])
    ours_err, plain_err = _err(context_grads(ours), context_grads(truth)), _err(context_grads(plain), context_grads(truth))
    assert ours_err <= 1.1 * plain_err, (ours_err, plain_err)
    peak = {i: measure_step_memory(set_context_impl(copy.deepcopy(base), i), x, y, None, True)["peak_activation_bytes"]
            for i in (impl, "plain")}
    assert peak[impl] < peak["plain"], peak
