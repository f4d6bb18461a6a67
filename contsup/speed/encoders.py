"""Memory-lean context encoders: the paper's plain encoders, computed with fewer saved
activations and fewer passes over memory. A speed option the method never needs.

`model.ImageEncoder` / `model.ResidualEncoder` are plain `nn.Sequential`s of conv+BN+ReLU
blocks and an adaptive average pool, run by autograd. `set_context_impl(net, impl)` swaps
each encoder's `nn.Sequential` for an `EncoderChain` holding the *same* layer objects (the
same parameters, buffers and state_dict keys), which runs them through `encoder_chain`
while training:

- `lean` (the trainer's default on a CPU: `resolve_context_impl`) keeps the least and
  recomputes the widest conv in the backward;
- `fused` keeps the pre-BN conv outputs (faster, more memory);
- `plain` puts the autograd `nn.Sequential` back (the reference).

Each way computes the same function: tests/test_performance.py compares outputs, every
gradient and BN's running statistics with the plain encoders in float64. Under autocast
(train --bf16) lean and fused make autocast's casts themselves -- convolutions and
activations in bfloat16, BN's parameters and statistics in float32 -- and so keep their
memory; tests/test_encoders_bf16.py holds them as close to float32 as plain under bf16.

An encoder is a chain of conv+BN+ReLU layers followed by an adaptive average pool. Plain
autograd saves, per layer, the conv output (for BN) and the ReLU output (for ReLU and the
next conv): at the image resolution that is far more than a late module's own
activations. `_EncoderChainFn` computes the same forward (BN's running-stat update exactly
once) and saves only the pre-BN conv outputs z_l and the BN batch statistics; the backward
rebuilds each ReLU output from its z_l (it is the next conv's input, and it gives the
ReLU's mask). With `lean` it does not keep the last (widest) z either and recomputes the
last conv in batch slices during the backward: where the pool shrinks the map it saves two
pooled maps (the pool of the ReLU mask and of mask * x_hat, which give BN's reductions
exactly), one extra conv forward in all; where the pool keeps the resolution it saves
nothing (the output is made in z's memory), two extra where the batch is cut into several
slices (one more pass then gives BN's reductions). A 1x1 last conv whose input needs no
gradient (a residual encoder's, detached) has a one-pass backward, the weight gradient
following from the mean and covariance of that (narrower) input (`_pointwise_backward`);
pooled, it takes its BN statistics from them too, and its full z never exists.
On a CPU the code counts passes over memory and keeps to fast kernels: BN+ReLU is one
addcmul and one in-place relu; BN's statistics and reductions are BatchNorm's own kernels on
a row view of the channels-last map (`_as_rows`, vectorised for any channel count); the
pool's and ReLU's backward is one threshold_backward of the pooled gradient broadcast over
each pooling block; BN's backward writes dL/dz into a buffer that is not needed after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError
from ..model import ContextSupply, ImageEncoder, ResidualEncoder

SHAPE = (1, -1, 1, 1)


def _stats_dtype(t):
    """The dtype BN statistics of `t` are summed in: float32 at least (a bfloat16 z's mean and
    variance in float32, as BatchNorm keeps them under autocast), float64 kept."""
    return torch.promote_types(t.dtype, torch.float32)


def _bn_momentum(bn: nn.BatchNorm2d):
    """Count one training step of `bn` and return this step's running-stat factor (as
    F.batch_norm does); None when `bn` keeps no running statistics."""
    if not (bn.track_running_stats and bn.num_batches_tracked is not None):
        return None
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


ROW_VALUES = 64  # BN's reductions over a channels-last map run on rows of a multiple of this many values


def _as_rows(t):
    """(view, r): a channels-last t [N, C, H, W] is an [N*H*W, C] matrix whose columns
    BatchNorm's CPU kernels reduce, vectorised along a row, one value at a time over what the
    SIMD width leaves (all of the image encoders' 12 hidden channels). As [N*H*W / r, r*C] a
    row is a multiple of ROW_VALUES values, which every SIMD width divides; column j holds
    channel j % C. (t, 1) where no view is needed (r == 1, not a CPU) or exists."""
    c = t.shape[1]
    r = ROW_VALUES // math.gcd(c, ROW_VALUES)
    pixels = t.numel() // c
    if r == 1 or t.device.type != "cpu" or pixels % r or not t.is_contiguous(memory_format=torch.channels_last):
        return t, 1
    return t.permute(0, 2, 3, 1).reshape(pixels // r, r * c), r


def _channel_stats(z):
    """z's batch mean and biased variance per channel, in the statistics' dtype: BatchNorm's
    own statistics kernel (no output written) on `_as_rows`'s view, whose r equal column
    groups are then merged exactly (Chan et al.)."""
    if z.device.type != "cpu":   # that kernel has no fake (meta) form; on CUDA BatchNorm's writes an output
        return _sliced_stats(z)
    rows, r = _as_rows(z)
    # running buffers it leaves as they are (momentum 0); they make a bfloat16 z's statistics float32
    scratch = z.new_zeros(2, rows.shape[1], dtype=_stats_dtype(z))
    mean, var = torch.batch_norm_update_stats(rows, scratch[0], scratch[1], 0.0)
    if r > 1:
        means, var = mean.view(r, -1), var.view(r, -1)
        mean = means.mean(0)
        var = var.mean(0) + (means - mean).square_().mean(0)
    return mean, var


def _sliced_stats(z, slices: int = 8):
    """The same from sums over batch slices, merged exactly (Chan et al.): float32 sums of a
    bfloat16 z without a float32 copy of all of it."""
    count, mean, m2, step = 0, 0.0, 0.0, -(-z.shape[0] // slices)
    for s in range(0, z.shape[0], step):
        zs = z[s:s + step]
        c = zs.numel() // zs.shape[1]
        m = zs.sum((0, 2, 3), dtype=_stats_dtype(zs)) / c
        delta = m - mean
        m2 = m2 + (zs - m.view(SHAPE)).square_().sum((0, 2, 3)) + delta.square() * (count * c / (count + c))
        mean, count = mean + delta * (c / (count + c)), count + c
    return mean, m2 / count


def _bn_train_stats(z, bn: nn.BatchNorm2d):
    """Batch mean and 1/std of z, with BatchNorm's running-stat update, without its output."""
    mean, var = _channel_stats(z)
    return _bn_batch_stats(bn, mean, var, z.numel() // z.shape[1])


def _centred(h, mu):
    """h - mu as a [C, N*H*W] matrix (a view of the difference where h is channels-last)."""
    return (h - mu.view(SHAPE)).transpose(0, 1).reshape(h.shape[1], -1)


def _input_moments(h, step: int):
    """(mu, S): the mean of h's channels and the centred sum of their outer products (S / count
    is their covariance), in the statistics' dtype, centred `step` batch rows at a time."""
    c_in, acc = h.shape[1], _stats_dtype(h)
    mu = h.sum((0, 2, 3), dtype=acc) / (h.numel() // c_in)
    cov = h.new_zeros(c_in, c_in, dtype=acc)
    for s in range(0, h.shape[0], step):
        hc = _centred(h[s:s + step], mu)
        cov.addmm_(hc, hc.t())
        del hc
    return mu, cov


def _pointwise_matrix(weight, dtype):
    """A 1x1 conv's weight as the [C_out, C_in] matrix it multiplies each pixel by."""
    return weight.reshape(weight.shape[0], -1).to(dtype)


def _bn_train_stats_1x1(h, weight, moments, bn: nn.BatchNorm2d):
    """The same for z = conv1x1(h) without computing z, from h's `_input_moments` (mu, S):
    z's channel means are W mu and its variances the diagonal of W S W^T / count. h has
    fewer channels than z and no conv is run."""
    mu, cov = moments
    count = h.numel() // h.shape[1]
    w = _pointwise_matrix(weight, mu.dtype)
    var = ((w @ cov) * w).sum(1).clamp_(min=0) / count
    return _bn_batch_stats(bn, w @ mu, var, count)


def _bn_batch_stats(bn: nn.BatchNorm2d, mean, var, count: int):
    """BatchNorm's running-stat update (unbiased variance) with this batch's mean and biased
    variance over `count` values per channel; returns (mean, 1/std) for normalising."""
    factor = _bn_momentum(bn)
    if factor is not None:
        bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        bn.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)
    return mean, (var + bn.eps).rsqrt()


@dataclass
class _Layer:
    """One conv+BN+ReLU layer of an encoder chain, as `_EncoderChainFn` keeps it from the
    forward to the backward: its modules (hyper-parameters, BN's running statistics), its
    parameters, and what this step saved of it."""
    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    weight: torch.Tensor                # conv.weight
    gamma: torch.Tensor                 # bn.weight
    beta: torch.Tensor                  # bn.bias
    z: torch.Tensor | None = None       # the pre-BN conv output; None where the backward recomputes it
    mean: torch.Tensor | None = None    # BN's batch mean of z
    invstd: torch.Tensor | None = None  # BN's batch 1/std of z

    def relu_out(self):
        """The layer's output relu(bn(z)), rebuilt from the saved z."""
        return _bn_relu(self.z, self)


# The tensors of a _Layer, in the order they go through ctx.save_for_backward (None allowed):
# saved there, autograd checks that no parameter changed in place before the backward.
_SAVED = ("weight", "gamma", "beta", "z", "mean", "invstd")


def _bn_out(z, layer: _Layer, out=None):
    """batch_norm(z) with the layer's batch statistics (the ReLU's input), in z's dtype: a
    new tensor, or written into `out` (which may be z itself)."""
    scale = layer.invstd * layer.gamma
    shift = layer.beta - layer.mean * scale
    return torch.addcmul(shift.to(z.dtype).view(SHAPE), z, scale.to(z.dtype).view(SHAPE), out=out)


def _bn_relu(z, layer: _Layer, out=None):
    """relu(batch_norm(z)) with the layer's batch statistics (see `_bn_out`)."""
    return _bn_out(z, layer, out).relu_()


def _relu_backward_(g, relu_in):
    """g where the ReLU was active (its input, or output, > 0), 0 elsewhere; written into g."""
    return torch.ops.aten.threshold_backward.grad_input(g, relu_in, 0.0, grad_input=g)


def _pool_relu_backward(g, y):
    """dL/dy of pool_to(relu(y), side) from g = dL/d(pooled), in y's memory (y is not needed
    after): for the identity or a k x k average pool one threshold_backward of g (/ k^2)
    broadcast over each block, no copy of g, no zero-filled gradient; else pool_to_backward."""
    (H, W), (h, w) = y.shape[-2:], g.shape[-2:]
    if H % h or W % w:
        return _relu_backward_(pool_to_backward(g, y), y)
    kh, kw = H // h, W // w
    if kh * kw == 1:
        return torch.ops.aten.threshold_backward.grad_input(g, y, 0.0, grad_input=y)
    blocks = y.unflatten(3, (w, kw)).unflatten(2, (h, kh))          # [B, C, h, kh, w, kw], a view
    g = (g * (1.0 / (kh * kw))).unflatten(3, (w, 1)).unflatten(2, (h, 1))
    torch.ops.aten.threshold_backward.grad_input(g, blocks, 0.0, grad_input=blocks)
    return y


def _bn_reductions(g, z, layer: _Layer):
    """(Σ g * x_hat, Σ g) per channel: BatchNorm's weight and bias gradients, by its own
    backward kernel on `_as_rows`'s views of g and z, the r column groups then summed."""
    (rows_g, r), (rows_z, r_z) = _as_rows(g), _as_rows(z)
    if r != r_z:   # g and z in different memory formats
        rows_g, rows_z, r = g, z, 1
    gamma, mean, invstd = (t.repeat(r) for t in (layer.gamma, layer.mean, layer.invstd))
    _, g_weight, g_bias = torch.ops.aten.native_batch_norm_backward(
        rows_g, rows_z, gamma, None, None, mean, invstd, True, 0.0, [False, True, True])
    return (g_weight.view(r, -1).sum(0), g_bias.view(r, -1).sum(0)) if r > 1 else (g_weight, g_bias)


def _bn_input_grad_coefficients(layer: _Layer, reductions, count: int):
    """(k1, k2, k3): dL/dz of BatchNorm (training) is invstd * weight * (g - mean(g) - x_hat *
    mean(g * x_hat)) = g*k1 + z*k2 + k3, from `reductions` = (Σ g * x_hat, Σ g) over `count`."""
    g_weight, g_bias = reductions
    k1 = layer.invstd * layer.gamma
    k2 = -k1 * layer.invstd * g_weight / count
    return k1, k2, -k1 * g_bias / count - k2 * layer.mean


def _bn_input_grad(g, z, layer: _Layer, reductions, count: int, out):
    """dL/dz of BatchNorm from g = dL/d(output) into `out`: g itself (three passes), or z or a free
    buffer (two); a bfloat16 g (autocast) in float32, rounded once, as BatchNorm's own backward."""
    k1, k2, k3 = _bn_input_grad_coefficients(layer, reductions, count)
    if g.dtype != k1.dtype:
        return out.copy_(torch.addcmul(k3.view(SHAPE), z, k2.view(SHAPE)).addcmul_(g, k1.view(SHAPE)))
    if out is g:
        return g.mul_(k1.view(SHAPE)).addcmul_(z, k2.view(SHAPE)).add_(k3.view(SHAPE))
    return torch.addcmul(k3.view(SHAPE), z, k2.view(SHAPE), out=out).addcmul_(g, k1.view(SHAPE))


MIN_CHUNK_BYTES = 4 << 20  # smaller slices cost more in per-op overhead than they save


def _chunk_size(n: int, chunks: int, conv: nn.Conv2d, h) -> int:
    """Batch rows per slice when the last conv's output (as wide as its input h) is made in
    `chunks` slices: fewer slices when that output is small."""
    row_bytes = conv.out_channels * h.shape[2] * h.shape[3] * h.element_size()
    return min(n, max(-(-n // chunks), -(-MIN_CHUNK_BYTES // row_bytes)))


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1


def _conv(conv: nn.Conv2d, x, weight):
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_backward(conv: nn.Conv2d, grad, x, weight, need_input: bool):
    g_in, g_w, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0],
        conv.groups, [need_input, True, False])
    return g_in, g_w


class _EncoderChainFn(torch.autograd.Function):
    """The encoder chain, training mode. Saved: the input x and, per layer (`_Layer`), its
    pre-BN conv output z and BN batch mean and 1/std; the backward rebuilds each ReLU output
    from its z. With `lean` not the last z (`_lean_forward`: two small tensors or none,
    `kept`); the backward recomputes it (`_lean_last_layer`, `_pointwise_backward`)."""

    @staticmethod
    def forward(ctx, x, modules, side, lean, chunks, *params):
        # params: (conv.weight, bn.weight, bn.bias) per layer, flat, so that autograd sees them
        flat = iter(params)
        layers = [_Layer(conv, bn, next(flat), next(flat), next(flat)) for conv, bn in modules]
        h = x
        for layer in layers[:-1] if lean else layers:
            layer.z = _conv(layer.conv, h, layer.weight)
            layer.mean, layer.invstd = _bn_train_stats(layer.z, layer.bn)
            h = _bn_relu(layer.z, layer)
        ctx.one_pass = False
        if not lean:
            pooled, kept = pool_to(h, side), (None, None)
        else:
            need_in = len(layers) > 1 or ctx.needs_input_grad[0]
            ctx.one_pass = _is_pointwise(layers[-1].conv) and not need_in
            pooled, kept = _lean_forward(layers[-1], h, side, chunks, ctx.one_pass)
        del h
        ctx.modules, ctx.lean, ctx.chunks = modules, lean, chunks
        ctx.save_for_backward(x, *kept, *(getattr(layer, name) for layer in layers for name in _SAVED))
        return pooled

    @staticmethod
    def backward(ctx, g_out):
        x, kept_a, kept_b, *saved = ctx.saved_tensors
        flat = iter(saved)
        layers = [_Layer(conv, bn, **{name: next(flat) for name in _SAVED}) for conv, bn in ctx.modules]
        grads = [None] * len(layers)   # (conv.weight, bn.weight, bn.bias) gradients per layer
        need_x = ctx.needs_input_grad[0]

        # The last layer: pool, ReLU and BN backward, then its conv.
        last = layers[-1]
        h_in = x if len(layers) == 1 else layers[-2].relu_out()   # input of the last conv
        need_in = len(layers) > 1 or need_x
        if not ctx.lean:
            z = last.z
            g_t = _pool_relu_backward(g_out, _bn_out(z, last))
            g_gamma, g_beta = _bn_reductions(g_t, z, last)
            g_z = _bn_input_grad(g_t, z, last, (g_gamma, g_beta), z.numel() // z.shape[1], out=g_t)
            g_h, g_w = _conv_backward(last.conv, g_z, h_in, last.weight, need_in)
            del g_z, g_t
        elif ctx.one_pass:
            g_h, (g_w, g_gamma, g_beta) = None, _pointwise_backward(ctx, last, h_in, g_out, (kept_a, kept_b))
        else:  # recompute the last conv in batch chunks
            g_h, g_w, g_gamma, g_beta = _lean_last_layer(ctx, last, h_in, g_out, (kept_a, kept_b), need_in)
        grads[-1] = (g_w, g_gamma, g_beta)
        # Earlier layers: ReLU, BN and conv backward from the saved z's.
        for i in range(len(layers) - 2, -1, -1):
            layer, z = layers[i], layers[i].z
            g_h = _relu_backward_(g_h, h_in)      # h_in is this layer's ReLU output
            g_gamma, g_beta = _bn_reductions(g_h, z, layer)
            g_z = _bn_input_grad(g_h, z, layer, (g_gamma, g_beta), z.numel() // z.shape[1], out=g_h)
            h_in = x if i == 0 else layers[i - 1].relu_out()
            g_h, g_w = _conv_backward(layer.conv, g_z, h_in, layer.weight, i > 0 or need_x)
            grads[i] = (g_w, g_gamma, g_beta)
        return (g_h if need_x else None, None, None, None, None, *(g for per_layer in grads for g in per_layer))


def _pooled_like(t, n: int, side: int):
    """An uninitialised [n, C, side, side] tensor in t's dtype and memory format."""
    fmt = torch.channels_last if not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    return torch.empty((n, t.shape[1], side, side), dtype=t.dtype, device=t.device, memory_format=fmt)


def _lean_forward(last: _Layer, h, side: int, chunks: int, one_pass: bool):
    """A lean chain's last layer from its input h: (its pooled ReLU output, what the backward
    keeps). Unpooled: the output in z's own memory, nothing kept. Pooled, slice by slice:
    with `one_pass` (a 1x1 conv, no input gradient) the input's moments, else the pooled ReLU
    mask and mask * x_hat (they give BN's reductions exactly). A pooled 1x1 conv's z is only
    ever made in slices: its BN statistics come from the input's moments."""
    conv, w, B = last.conv, last.weight, h.shape[0]
    step = _chunk_size(B, chunks, conv, h)
    if _is_pointwise(conv) and h.shape[-2:] != (side, side):
        moments = _input_moments(h, step)
        last.mean, last.invstd = _bn_train_stats_1x1(h, w, moments, last.bn)
        z_of = lambda s: _conv(conv, h[s:s + step], w)  # noqa: E731
    else:
        z = _conv(conv, h, w)
        last.mean, last.invstd = _bn_train_stats(z, last.bn)
        if z.shape[-2:] == (side, side):   # the output is the ReLU output itself
            return _bn_relu(z, last, out=z), (None, None)
        z_of = lambda s: z[s:s + step]  # noqa: E731
    outs = [None, None, None]   # the pooled output, and (unless one_pass) pooled mask and mask * x_hat

    def put(i, s, t):   # pool t into rows s: of outs[i]
        if outs[i] is None:
            outs[i] = _pooled_like(t, B, side)
        pool_to(t, side, out=outs[i][s:s + t.shape[0]])

    mean, invstd = last.mean.view(SHAPE), last.invstd.view(SHAPE)
    gamma, beta = last.gamma.to(h.dtype).view(SHAPE), last.beta.to(h.dtype).view(SHAPE)
    for s in range(0, B, step):
        if one_pass:
            put(0, s, _bn_relu(z_of(s), last))
            continue
        xc = z_of(s).sub_(mean).mul_(invstd)   # x_hat
        t = torch.addcmul(beta, xc, gamma).relu_()
        put(0, s, t)
        mask = t.gt_(0)
        put(1, s, mask)
        put(2, s, mask.mul_(xc))
        del t, mask, xc
    if not one_pass:
        return outs[0], (outs[1], outs[2])
    small = sum(t.numel() for t in moments) <= 2 * outs[0].numel()   # than the masks (else summed again)
    return outs[0], moments if small else (None, None)


def _pointwise_backward(ctx, last: _Layer, h, g_out, moments):
    """The lean backward of a 1x1 last layer whose input h needs no gradient (a residual
    encoder's): one pass over batch slices, each recomputing z = W h. With g_t = dL/d(BN
    output), Σ g_t and C = Σ g_t (h - mu)^T give BN's reductions (Σ g_t x_hat = invstd *
    rowsum(W * C)) and, as BN's input gradient g_z = k1 g_t + k2 z + k3 (`_bn_input_grad`)
    sums to 0 per channel, dL/dW = Σ g_z h^T = k1 C + k2 W S, (mu, S) h's `_input_moments`
    (kept, or (None, None): summed again in the same pass). Returns the gradients of
    conv.weight, bn.weight and bn.bias."""
    step, acc = _chunk_size(h.shape[0], ctx.chunks, last.conv, h), _stats_dtype(h)
    mu, cov = moments
    again = mu is None
    if again:
        mu, cov = h.sum((0, 2, 3), dtype=acc) / (h.numel() // h.shape[1]), h.new_zeros(h.shape[1], h.shape[1], dtype=acc)
    w = _pointwise_matrix(last.weight, acc)
    g_bias, cross = 0, torch.zeros_like(w)
    for s in range(0, h.shape[0], step):
        hs = h[s:s + step]
        g_t = _pool_relu_backward(g_out[s:s + step], _bn_out(_conv(last.conv, hs, last.weight), last))
        g_bias = g_bias + g_t.sum((0, 2, 3), dtype=acc)
        hc = _centred(hs, mu)
        cross.addmm_(g_t.transpose(0, 1).reshape(g_t.shape[1], -1).to(acc), hc.t())
        if again:
            cov.addmm_(hc, hc.t())
        del g_t, hc
    g_weight = last.invstd * (w * cross).sum(1)
    k1, k2, _ = _bn_input_grad_coefficients(last, (g_weight, g_bias), h.numel() // h.shape[1])
    g_w = k1.view(-1, 1) * cross + k2.view(-1, 1) * (w @ cov)
    return g_w.to(last.weight.dtype).view(last.weight.shape), g_weight, g_bias


def _lean_last_layer(ctx, last, h_in, g_out, pooled: tuple, need_in: bool):
    """The lean backward of the last layer: pool, ReLU and BN backward, then its conv, with
    the conv recomputed in batch chunks (`pooled`: the saved pooled mask and mask * x_hat, or
    Nones). Returns (grad of its input or None, of conv.weight, of bn.weight, of bn.bias)."""
    p_mask, p_mx = pooled
    B = h_in.shape[0]
    step = _chunk_size(B, ctx.chunks, last.conv, h_in)

    def chunk_grad(s):  # (z, dL/d(BN output)) of one chunk
        z = _conv(last.conv, h_in[s:s + step], last.weight)
        return z, _pool_relu_backward(g_out[s:s + step], _bn_out(z, last))

    kept = None
    if p_mask is not None:  # the BN reductions from the pooled mask and mask * x_hat
        g_beta = (g_out * p_mask).sum((0, 2, 3))
        g_gamma = (g_out * p_mx).sum((0, 2, 3))
    else:                   # one more recompute of the last conv for them (kept if one slice)
        g_gamma, g_beta = 0, 0
        for s in range(0, B, step):
            z, g_t = chunk_grad(s)
            gg, gb = _bn_reductions(g_t, z, last)
            g_gamma, g_beta = g_gamma + gg, g_beta + gb
            kept = (z, g_t) if step == B else None
            del z, g_t
    g_w = torch.zeros_like(last.weight)
    g_h = torch.empty_like(h_in) if need_in else None
    count = None
    for s in range(0, B, step):
        z, g_t = kept or chunk_grad(s)
        kept = None
        count = count or B * z.shape[2] * z.shape[3]
        g_z = _bn_input_grad(g_t, z, last, (g_gamma, g_beta), count, out=z)
        gi, gw = _conv_backward(last.conv, g_z, h_in[s:s + step], last.weight, need_in)
        g_w += gw
        if need_in:
            g_h[s:s + step] = gi
        del z, g_t, g_z, gi, gw
    return g_h, g_w, g_gamma, g_beta


def encoder_chain(x, layers, side: int, lean: bool = False, chunks: int = 8, dtype=None):
    """adaptive_avg_pool(relu(bn(conv(... x ...))), side) over `layers` = [(conv, bn), ...],
    training mode, with fewer saved activations (see above); `lean` recomputes the last conv
    in the backward in `chunks` slices of the batch. `dtype` (autocast's, e.g. bfloat16; run
    with autocast off): the convolutions and the activations in it, as autocast runs a
    plain encoder; BN's parameters, statistics and gradients stay float32."""
    if dtype is not None:
        x = x.to(dtype)
    params = [p for conv, bn in layers for p in (conv.weight if dtype is None else conv.weight.to(dtype),
                                                  bn.weight, bn.bias)]
    return _EncoderChainFn.apply(x, layers, side, lean, chunks, *params)


def pool_to(h, side: int, out=None):
    """adaptive_avg_pool2d(h, side), by its cheapest exact form: nothing when h is already
    side x side, a plain f x f average pool when the side divides evenly; into `out` if given."""
    H, W = h.shape[-2:]
    if H == side and W == side:
        pooled = h
    elif H % side == 0 and W % side == 0:
        kernel = [H // side, W // side]
        if out is not None:
            return torch.ops.aten.avg_pool2d.out(h, kernel, kernel, [0, 0], False, True, None, out=out)
        pooled = F.avg_pool2d(h, kernel)
    else:
        pooled = F.adaptive_avg_pool2d(h, side)
    return pooled if out is None else out.copy_(pooled)


def pool_to_backward(g, like):
    """The gradient of pool_to(like, side) given g = dL/d(pooled); a new tensor shaped like `like`."""
    H, W = like.shape[-2:]
    h, w = g.shape[-2:]
    if (H, W) == (h, w):
        return g.clone(memory_format=torch.preserve_format)
    if H % h == 0 and W % w == 0:
        kernel = [H // h, W // w]
        return torch.ops.aten.avg_pool2d_backward(g, like, kernel, kernel, [0, 0], False, True, None)
    return torch.ops.aten._adaptive_avg_pool2d_backward(g.contiguous(), like)


class EncoderChain(nn.Sequential):
    """A plain encoder's blocks (conv+BN+ReLU ..., then the pool) under the same names, run
    by `encoder_chain` while training with gradients on (under autocast too: the casts it
    would make, made by `encoder_chain`, so that lean and fused keep their memory in bf16);
    otherwise block by block, as the plain encoder."""

    def __init__(self, plain: nn.Sequential, lean: bool):
        super().__init__(*plain)
        self.lean = lean
        pool = plain[-1].output_size
        self.side = pool if isinstance(pool, int) else pool[0]

    def forward(self, x):
        layers_and_pool = list(self)
        layers = [(block[0], block[1]) for block in layers_and_pool if isinstance(block, nn.Sequential)]
        if not (self.training and torch.is_grad_enabled()) or not all(bn.training for _, bn in layers):
            for block in layers_and_pool[:-1]:
                x = block(x)
            return pool_to(x, self.side)
        kind = x.device.type
        if not torch.is_autocast_enabled(kind):
            return encoder_chain(x, layers, self.side, lean=self.lean)
        with torch.autocast(kind, enabled=False):
            return encoder_chain(x, layers, self.side, lean=self.lean, dtype=torch.get_autocast_dtype(kind))


CONTEXT_IMPLS = ("lean", "fused", "plain")
AUTO = "auto"  # TrainConfig.context_impl's default: `resolve_context_impl` picks one per device


def resolve_context_impl(impl: str, device, compiled: bool = False, deterministic: bool = False) -> str:
    """The encoders' implementation a run uses on `device` (a torch.device or its type name),
    asked for as `impl` ("auto" or one of CONTEXT_IMPLS), compiled or not. The rule, written
    only here:

    - under torch.compile, plain, whatever was asked (speed/setup.compile_model runs it): inductor
      fuses BN, ReLU and pool by itself, and `_EncoderChainFn` (Python loops over batch
      slices, BN buffers updated in place) is not something dynamo captures in one graph;
    - otherwise `impl` itself, unless it is "auto":
    - auto on a CPU, lean: the encoders are memory-bound there, so a step pays for passes
      over memory, not for the number of ops; lean keeps the least activation memory (the
      paper's point) at a time close to fused's (bench_step.py, lean_R1E_time_vs_fused);
    - auto on a GPU (CUDA, MPS), plain: each aten op is a kernel launch, and lean (batch
      slices, chunked BN statistics) launches several times plain's ops in a step and fused
      (BN backward by hand) clearly more than plain, while a GPU has the memory that plain's
      saved activations take. A run that must fit the least memory there asks for lean;
    - auto on CUDA with `deterministic`, fused: plain's adaptive-pool backward has no
      deterministic CUDA kernel (setup.check_deterministic refuses it), fused pools with
      avg_pool2d, whose backward is deterministic, in fewer ops than lean.

    The op counts and times behind it: benchmarks/bench_encoders.py (aten_ops_per_step),
    benchmarks/results/encoder_ops_cpu.json and the GPU numbers of benchmarks/gpu_check.py.
    """
    if compiled:
        return "plain"
    if impl != AUTO:
        return impl
    kind = torch.device(device).type
    if kind == "cpu":
        return "lean"
    return "fused" if deterministic and kind == "cuda" else "plain"


def set_context_impl(net: nn.Module, impl: str) -> nn.Module:
    """Choose how the context encoders of `net` run (the same function each way): lean
    recomputes the widest conv in the backward, fused keeps the pre-BN conv outputs, plain
    is autograd on the paper's nn.Sequential. The parameters stay the same objects, so an
    optimizer built before the swap keeps working. Only the paper's conv+BN+ReLU chains
    (ImageEncoder, ResidualEncoder: feature maps) have a lean and a fused form; any other
    encoder (a wrapped transformer's token encoders, tokens.py) always runs plain, whatever
    `impl` says: `encoder_impls` counts which way each runs."""
    if impl not in CONTEXT_IMPLS:
        raise UsageError(f"unknown context implementation '{impl}'; choose one of: {', '.join(CONTEXT_IMPLS)}")
    encoders = [m for m in net.modules() if isinstance(m, (ImageEncoder, ResidualEncoder))]
    for enc in encoders:
        plain = nn.Sequential(*enc.net)   # the same layer objects, under the same names
        enc.net = plain if impl == "plain" else EncoderChain(plain, lean=impl == "lean")
    return net


def encoder_impls(net: nn.Module) -> dict[str, int]:
    """How many context encoders of `net` run each way (set_context_impl); "plain" counts
    the encoders without a lean form (token encoders) too."""
    counts: dict[str, int] = {}
    for part in (m for m in net.modules() if isinstance(m, ContextSupply)):
        for enc in ([part.image] if part.image is not None else []) + list(part.residual):
            chain = getattr(enc, "net", None)
            impl = ("lean" if chain.lean else "fused") if isinstance(chain, EncoderChain) else "plain"
            counts[impl] = counts.get(impl, 0) + 1
    return counts
