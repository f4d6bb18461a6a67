"""Memory-lean context encoders: the paper's plain encoders, computed with fewer saved
activations and fewer passes over memory. A speed option the method never needs.

`model.ImageEncoder` / `model.ResidualEncoder` are plain `nn.Sequential`s of conv+BN+ReLU
blocks and an adaptive average pool, run by autograd. `set_context_impl(net, impl)` swaps
each encoder's `nn.Sequential` for an `EncoderChain` holding the *same* layer objects (the
same parameters, buffers and state_dict keys), which runs them through `encoder_chain`
while training:

- `lean` (the trainer's default) keeps the least and recomputes the widest conv in the
  backward;
- `fused` keeps the pre-BN conv outputs (faster, more memory);
- `plain` puts the autograd `nn.Sequential` back (the reference).

Each way computes the same function: tests/test_performance.py compares outputs, every
gradient and BN's running statistics with the plain encoders in float64.

An encoder is a chain of conv+BN+ReLU layers followed by an adaptive average pool. Plain
autograd saves, per layer, the conv output (for BN) and the ReLU output (for ReLU and the
next conv): at the image resolution that is far more than a late module's own
activations. `_EncoderChainFn` computes the same forward (same ops, same BN running-stat
update, exactly once) and saves only the pre-BN conv outputs z_l and the BN batch
statistics; the backward rebuilds each ReLU output from its z_l (it is the next conv's
input, and it gives the ReLU's mask). With `lean` it does not keep the last (widest) z
either: where the pool shrinks the map it saves two pooled maps instead (the pool of the
ReLU mask and of mask * x_hat, which give the BN reductions exactly) and recomputes the
last conv in batch chunks during the backward, one extra conv forward in all (two where
the pool keeps the resolution and the batch is cut into several chunks: one more pass
then gives the BN reductions). A 1x1 last conv
takes its BN statistics from the mean and covariance of its (narrower) input and is run
chunk by chunk in the forward too, so its full z never exists at all.
At the image resolution these encoders are memory-bound on a CPU, so the code counts
passes over memory: BN+ReLU is one addcmul and one in-place relu, the BN backward writes
dL/dz into the incoming gradient, and the ReLU mask is applied by threshold_backward
against the ReLU output (a bool mask times a float tensor costs three times as much).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError
from ..model import ImageEncoder, ResidualEncoder

SHAPE = (1, -1, 1, 1)


def _bn_momentum(bn: nn.BatchNorm2d):
    """Count one training step of `bn` and return this step's running-stat factor (as
    F.batch_norm does); None when `bn` keeps no running statistics."""
    if not (bn.track_running_stats and bn.num_batches_tracked is not None):
        return None
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _bn_train_forward(z, bn: nn.BatchNorm2d):
    """F.batch_norm in training mode, returning (out, mean, invstd); updates running stats once."""
    factor = _bn_momentum(bn)
    return torch.native_batch_norm(z, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                   True, factor or 0.0, bn.eps)


def _bn_train_stats(z_of, n: int, step: int, bn: nn.BatchNorm2d):
    """Batch mean and 1/std of z, with BatchNorm's running-stat update, without its output.
    z_of(s) gives z's batch rows s:s+step (sliced or recomputed); each chunk's mean and
    centred sum of squares are merged exactly (Chan et al.), so the whole z never has to
    exist at once (and torch.var_mean over (0, 2, 3) is ~5x slower on a CPU)."""
    count, mean, m2 = 0, 0.0, 0.0
    for s in range(0, n, step):
        z = z_of(s)
        c = z.numel() // z.shape[1]
        m = z.sum((0, 2, 3)) / c
        q = (z - m.view(SHAPE)).square_().sum((0, 2, 3))
        delta = m - mean
        mean = mean + delta * (c / (count + c))
        m2 = m2 + q + delta.square() * (count * c / (count + c))
        count += c
        del z
    return _bn_batch_stats(bn, mean, m2 / count, count)


def _bn_train_stats_1x1(h, weight, step: int, bn: nn.BatchNorm2d):
    """The same for z = conv1x1(h) without computing z: its channel means are W mu and its
    variances the diagonal of W Sigma W^T, from the mean mu and covariance Sigma of h's
    channels (centred, chunk by chunk). h has fewer channels than z and no conv is run."""
    c_in, n = h.shape[1], h.shape[0]
    count = h.numel() // c_in
    mu = h.sum((0, 2, 3)) / count
    cov = h.new_zeros(c_in, c_in)
    for s in range(0, n, step):
        hc = (h[s:s + step] - mu.view(SHAPE)).transpose(0, 1).reshape(c_in, -1)
        cov.addmm_(hc, hc.t())
        del hc
    w = weight.view(weight.shape[0], c_in)
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


def _bn_relu(z, mean, invstd, weight, bias):
    """relu(batch_norm(z)) with the given batch statistics, as a new tensor."""
    scale = invstd * weight
    return torch.addcmul((bias - mean * scale).view(SHAPE), z, scale.view(SHAPE)).relu_()


def _relu_backward_(g, relu_out):
    """g where the ReLU was active, 0 elsewhere; written into g."""
    return torch.ops.aten.threshold_backward.grad_input(g, relu_out, 0.0, grad_input=g)


def _bn_reductions(g, z, mean, invstd, weight):
    """(Σ g * x_hat, Σ g) per channel: BatchNorm's weight and bias gradients."""
    _, g_weight, g_bias = torch.ops.aten.native_batch_norm_backward(
        g, z, weight, None, None, mean, invstd, True, 0.0, [False, True, True])
    return g_weight, g_bias


def _bn_input_grad_(g, z, mean, invstd, weight, g_weight, g_bias, count: int):
    """dL/dz of BatchNorm (training) from g = dL/d(output), written into g:
    invstd * weight * (g - mean(g) - x_hat * mean(g * x_hat)), as g*k1 + z*k2 + k3."""
    k1 = invstd * weight
    k2 = -k1 * invstd * g_weight / count
    k3 = -k1 * g_bias / count - k2 * mean
    return g.mul_(k1.view(SHAPE)).addcmul_(z, k2.view(SHAPE)).add_(k3.view(SHAPE))


MIN_CHUNK_BYTES = 4 << 20  # smaller slices cost more in per-op overhead than they save


def _chunk_size(n: int, chunks: int, conv: nn.Conv2d, h) -> int:
    """Batch rows per slice when the last conv's output (as wide as its input h) is made in
    `chunks` slices: fewer slices when that output is small."""
    row_bytes = conv.out_channels * h.shape[2] * h.shape[3] * h.element_size()
    return min(n, max(-(-n // chunks), -(-MIN_CHUNK_BYTES // row_bytes)))


def _conv(conv: nn.Conv2d, x, weight):
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_backward(conv: nn.Conv2d, grad, x, weight, need_input: bool):
    g_in, g_w, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0],
        conv.groups, [need_input, True, False])
    return g_in, g_w


class _EncoderChainFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layers, side, lean, chunks, *params):
        # params: (conv.weight, bn.weight, bn.bias) per layer
        ctx.layers, ctx.side, ctx.lean, ctx.chunks = layers, side, lean, chunks
        h, saved, stats = x, [], []
        n = len(layers)
        for i, (conv, bn) in enumerate(layers[:n - 1] if lean else layers):
            z = _conv(conv, h, params[3 * i])
            out, mean, invstd = _bn_train_forward(z, bn)
            stats += [mean, invstd]
            h = out.relu_()
            saved.append(z)
        if not lean:
            pooled = pool_to(h, side)
        else:  # output (and, where pooled, pooled ReLU mask and mask * x_hat) chunk by chunk
            conv, bn = layers[-1]
            w, B = params[-3], h.shape[0]
            step = _chunk_size(B, chunks, conv, h)
            pointwise = conv.kernel_size == conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
            if pointwise:  # z is only ever made in chunks
                z_of = lambda s: _conv(conv, h[s:s + step], w)  # noqa: E731
                mean, invstd = _bn_train_stats_1x1(h, w, step, bn)
            else:          # computed once, sliced
                z = _conv(conv, h, w)
                z_of = lambda s: z[s:s + step]  # noqa: E731
                mean, invstd = _bn_train_stats(z_of, B, step, bn)
            stats += [mean, invstd]
            gamma, beta = params[-2].view(SHAPE), params[-1].view(SHAPE)
            ctx.pooled_stats = side < h.shape[-1]
            parts = ([], [], [])
            for s in range(0, B, step):
                if not ctx.pooled_stats:  # the output is the ReLU output itself
                    parts[0].append(_bn_relu(z_of(s), mean, invstd, params[-2], params[-1]))
                    continue
                xc = z_of(s).sub_(mean.view(SHAPE)).mul_(invstd.view(SHAPE))   # x_hat
                t = torch.addcmul(beta, xc, gamma).relu_()
                parts[0].append(pool_to(t, side))
                mask = t.gt_(0)
                parts[1].append(pool_to(mask, side))
                parts[2].append(pool_to(mask.mul_(xc), side))
                del t, mask, xc
            pooled, *pooled_stats = (p[0] if len(p) == 1 else torch.cat(p) for p in parts if p)
            saved += pooled_stats
            z = z_of = parts = None
        del h
        ctx.save_for_backward(x, *saved, *stats, *params)
        return pooled

    @staticmethod
    def backward(ctx, g_out):
        layers, side, lean, n = ctx.layers, ctx.side, ctx.lean, len(ctx.layers)
        tensors = ctx.saved_tensors
        x = tensors[0]
        n_z = n - 1 if lean else n
        zs = list(tensors[1:1 + n_z])
        pos = 1 + n_z
        pooled_stats = tensors[pos:pos + 2] if lean and ctx.pooled_stats else None   # (p_mask, p_mx)
        pos += 2 if pooled_stats else 0
        stats = tensors[pos:pos + 2 * n]
        params = tensors[pos + 2 * n:]
        grads = [None] * (3 * n)
        need_x = ctx.needs_input_grad[0]

        def bn_args(i):  # (mean, invstd, weight) of layer i
            return stats[2 * i], stats[2 * i + 1], params[3 * i + 1]

        def relu_out(i):  # the ReLU output of layer i, rebuilt from its saved z
            return _bn_relu(zs[i], *bn_args(i), params[3 * i + 2])

        # The last layer: pool, ReLU and BN backward, then its conv.
        conv_l = layers[-1][0]
        w_l = params[3 * (n - 1)]
        h_in = x if n == 1 else relu_out(n - 2)   # input of the last conv
        need_in = n > 1 or need_x
        if not lean:
            z = zs[-1]
            r = relu_out(n - 1)
            g_t = _relu_backward_(pool_to_backward(g_out, r), r)
            del r
            g_gamma, g_beta = _bn_reductions(g_t, z, *bn_args(n - 1))
            g_z = _bn_input_grad_(g_t, z, *bn_args(n - 1), g_gamma, g_beta, z.numel() // z.shape[1])
            g_h, g_w = _conv_backward(conv_l, g_z, h_in, w_l, need_in)
            del g_z, g_t
        else:  # recompute the last conv in batch chunks
            B = h_in.shape[0]
            step = _chunk_size(B, ctx.chunks, conv_l, h_in)

            def chunk_grad(s):  # (z, dL/d(BN output)) of one chunk
                z = _conv(conv_l, h_in[s:s + step], w_l)
                r = _bn_relu(z, *bn_args(n - 1), params[-1])
                return z, _relu_backward_(pool_to_backward(g_out[s:s + step], r), r)

            kept = None
            if pooled_stats:  # the BN reductions from the pooled mask and mask * x_hat
                p_mask, p_mx = pooled_stats
                g_beta = (g_out * p_mask).sum((0, 2, 3))
                g_gamma = (g_out * p_mx).sum((0, 2, 3))
            else:             # one more recompute of the last conv for them (kept if one slice)
                g_gamma, g_beta = 0, 0
                for s in range(0, B, step):
                    z, g_t = chunk_grad(s)
                    gg, gb = _bn_reductions(g_t, z, *bn_args(n - 1))
                    g_gamma, g_beta = g_gamma + gg, g_beta + gb
                    kept = (z, g_t) if step == B else None
                    del z, g_t
            g_w = torch.zeros_like(w_l)
            g_h = torch.empty_like(h_in) if need_in else None
            count = None
            for s in range(0, B, step):
                z, g_t = kept or chunk_grad(s)
                kept = None
                count = count or B * z.shape[2] * z.shape[3]
                g_z = _bn_input_grad_(g_t, z, *bn_args(n - 1), g_gamma, g_beta, count)
                gi, gw = _conv_backward(conv_l, g_z, h_in[s:s + step], w_l, need_in)
                g_w += gw
                if need_in:
                    g_h[s:s + step] = gi
                del z, g_t, g_z, gi, gw
        grads[3 * (n - 1):3 * n] = [g_w, g_gamma, g_beta]
        # Earlier layers: ReLU, BN and conv backward from the saved z's.
        for i in range(n - 2, -1, -1):
            z = zs[i]
            g_h = _relu_backward_(g_h, h_in)      # h_in is layer i's ReLU output
            g_gamma, g_beta = _bn_reductions(g_h, z, *bn_args(i))
            g_z = _bn_input_grad_(g_h, z, *bn_args(i), g_gamma, g_beta, z.numel() // z.shape[1])
            h_in = x if i == 0 else relu_out(i - 1)
            g_h, g_w = _conv_backward(layers[i][0], g_z, h_in, params[3 * i], i > 0 or need_x)
            grads[3 * i:3 * i + 3] = [g_w, g_gamma, g_beta]
        return (g_h if need_x else None, None, None, None, None, *grads)


def encoder_chain(x, layers, side: int, lean: bool = False, chunks: int = 8):
    """adaptive_avg_pool(relu(bn(conv(... x ...))), side) over `layers` = [(conv, bn), ...],
    training mode, with fewer saved activations (see above); `lean` recomputes the last conv
    in the backward in `chunks` slices of the batch."""
    params = [p for conv, bn in layers for p in (conv.weight, bn.weight, bn.bias)]
    return _EncoderChainFn.apply(x, layers, side, lean, chunks, *params)


def pool_to(h, side: int):
    """adaptive_avg_pool2d(h, side), by its cheapest exact form: nothing when h is already
    side x side, a plain f x f average pool when the side divides evenly."""
    H, W = h.shape[-2:]
    if H == side and W == side:
        return h
    if H % side == 0 and W % side == 0:
        return F.avg_pool2d(h, (H // side, W // side))
    return F.adaptive_avg_pool2d(h, side)


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
    by `encoder_chain` while training with gradients on; otherwise block by block, as the
    plain encoder (autocast included: autograd handles its casts)."""

    def __init__(self, plain: nn.Sequential, lean: bool):
        super().__init__(*plain)
        self.lean = lean
        pool = plain[-1].output_size
        self.side = pool if isinstance(pool, int) else pool[0]

    def forward(self, x):
        layers_and_pool = list(self)
        layers = [(block[0], block[1]) for block in layers_and_pool if isinstance(block, nn.Sequential)]
        if not (self.training and torch.is_grad_enabled()) or torch.is_autocast_enabled(x.device.type) \
                or not all(bn.training for _, bn in layers):
            for block in layers_and_pool[:-1]:
                x = block(x)
            return pool_to(x, self.side)
        return encoder_chain(x, layers, self.side, lean=self.lean)


CONTEXT_IMPLS = ("lean", "fused", "plain")


def set_context_impl(net: nn.Module, impl: str) -> nn.Module:
    """Choose how the context encoders of `net` run (the same function each way): lean
    recomputes the widest conv in the backward, fused keeps the pre-BN conv outputs, plain
    is autograd on the paper's nn.Sequential. The parameters stay the same objects, so an
    optimizer built before the swap keeps working."""
    if impl not in CONTEXT_IMPLS:
        raise UsageError(f"unknown context implementation '{impl}'; choose one of: {', '.join(CONTEXT_IMPLS)}")
    encoders = [m for m in net.modules() if isinstance(m, (ImageEncoder, ResidualEncoder))]
    for enc in encoders:
        plain = nn.Sequential(*enc.net)   # the same layer objects, under the same names
        enc.net = plain if impl == "plain" else EncoderChain(plain, lean=impl == "lean")
    return net
