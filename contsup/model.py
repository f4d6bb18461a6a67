"""The network: a CIFAR ResNet cut into K gradient-isolated local modules (SPEC §2-§4).

    image x ──> [module 0] ─h0─> (cut 0) ─> [module 1] ─h1─> (cut 1) ─> ... ─> [module K-1] ─> classifier
                     │                │                                         
                 local head 0     h0.detach() + Σ context encoders(...)   = input of module 1

Each module but the last ends in a small auxiliary head (`AuxHead`, and optionally a
reconstruction `Decoder`) that gives it a local loss. At every cut the next module's input
is the *detached* module output plus the context supply (`ContextSupply`): encoders of the
raw image (mode E) and/or of the inputs of the last n modules (mode Rn). The encoders are
trained by the next module's loss; no gradient ever crosses a cut. K=1 is plain end-to-end.

The training loop that calls `loss.backward()` per module lives in `train.py`; this file
only builds modules and composes inputs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import tables
from .errors import UsageError, check_bool, check_float, check_int, check_str

HEAD_CONFIGS = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")
LOSSES = ("softmax", "contrast")
FEATURE_DIM = 128  # hidden width of the heads' fc layers and the contrast embedding size


# --------------------------------------------------------------------------------------
# Backbone pieces
def conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def conv_bn_relu(c_in, c_out, kernel=3, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def backbone_layers(arch: str):
    """The ResNet as a flat list of ((stage, block), layer); stage 0 is the stem."""
    tables.check_arch(arch)
    layers = [((0, 0), conv_bn_relu(3, tables.STAGE_WIDTHS[0]))]
    c_in = tables.STAGE_WIDTHS[0]
    for stage, width in enumerate(tables.STAGE_WIDTHS, start=1):
        for block in range(tables.BLOCKS_PER_STAGE[arch]):
            stride = 2 if (stage > 1 and block == 0) else 1
            layers.append(((stage, block), BasicBlock(c_in, width, stride)))
            c_in = width
    return layers


def feature_shape(stage: int, image_size: int) -> tuple[int, int]:
    """(channels, side) of the output of any layer of `stage` (stage 0 = stem)."""
    channels = tables.STAGE_WIDTHS[max(stage - 1, 0)]
    side = image_size
    for _ in range(max(stage - 1, 0)):  # stages 2 and 3 halve the side (3x3, stride 2, pad 1)
        side = (side + 1) // 2
    return channels, side


# --------------------------------------------------------------------------------------
# Local heads and decoders (SPEC §4)
class AuxHead(nn.Module):
    """Auxiliary head on a module output; config '<convs>c<fcs>f' (the paper's default: 1c2f).

    The conv maps C->2C with stride 2 for C in {16, 32} and 64->64 with stride 1; fc layers
    are FEATURE_DIM wide; `widen` scales the hidden widths. Outputs class logits (softmax)
    or a FEATURE_DIM embedding (contrast).
    """

    def __init__(self, channels: int, config: str, out_dim: int, widen: float = 1.0):
        super().__init__()
        if config not in HEAD_CONFIGS:
            raise UsageError(f"unknown head config '{config}'; choose one of: {', '.join(HEAD_CONFIGS)}")
        n_conv, n_fc = int(config[0]), int(config[2])
        layers, c = [], channels
        for i in range(n_conv):
            c_out = int(64 * widen) if channels == 64 else int(2 * channels * widen)
            stride = 1 if (channels == 64 or i > 0) else 2
            layers.append(conv_bn_relu(c, c_out, stride=stride))
            c = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        hidden = int(FEATURE_DIM * widen)
        for _ in range(n_fc - 1):
            layers += [nn.Linear(c, hidden), nn.ReLU(inplace=True)]
            c = hidden
        layers.append(nn.Linear(c, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, h):
        return self.net(h)


class Decoder(nn.Module):
    """Reconstruction decoder: bilinear upsample of h to the image size, conv(C->12)+BN+ReLU,
    conv(12->3). Returns logits; the sigmoid is folded into the BCE loss."""

    def __init__(self, channels: int, image_size: int, widen: float = 1.0):
        super().__init__()
        self.image_size = image_size
        hidden = int(12 * widen)
        self.net = nn.Sequential(conv_bn_relu(channels, hidden), nn.Conv2d(hidden, 3, 3, padding=1))

    def forward(self, h):
        h = F.interpolate(h, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)
        return self.net(h)


# --------------------------------------------------------------------------------------
# Context supply (SPEC §2)
@dataclass(frozen=True)
class ContextMode:
    """R<n> (residual context from the inputs of the last n modules) and/or E (image)."""
    n: int
    image: bool

    @property
    def name(self) -> str:
        return ("E" if self.n == 0 else f"R{self.n}E") if self.image else f"R{self.n}"


_MODE_RE = re.compile(r"^(?:R(\d+)(E?)|E)$")


def parse_mode(mode: str, k: int | None) -> ContextMode:
    """The context mode `mode` of a network of K=k modules (k None: the spelling only)."""
    m = _MODE_RE.match(mode)
    if m is None:
        raise UsageError(f"unknown context mode '{mode}'; choose R0, E, Rn or RnE "
                         "(n = 1, 2, 4, ... up to K), e.g. R1E")
    parsed = ContextMode(int(m.group(1) or 0), mode == "E" or m.group(2) == "E")
    if k is not None and parsed.n > k:
        raise UsageError(f"mode {mode} needs context from {parsed.n} modules but K={k}; use K >= {parsed.n}")
    return parsed


# --------------------------------------------------------------------------------------
# Memory-lean context encoders (same function, fewer saved activations, fewer passes)
#
# An encoder is a chain of conv+BN+ReLU layers followed by an adaptive average pool. Plain
# autograd saves, per layer, the conv output (for BN) and the ReLU output (for ReLU and the
# next conv): at the image resolution that is far more than a late module's own
# activations. `_EncoderChainFn` computes the same forward (same ops, same BN running-stat
# update, exactly once) and saves only the pre-BN conv outputs z_l and the BN batch
# statistics; the backward rebuilds each ReLU output from its z_l (it is the next conv's
# input, and it gives the ReLU's mask). With `lean` it does not keep the last (widest) z
# either: where the pool shrinks the map it saves two pooled maps instead (the pool of the
# ReLU mask and of mask * x_hat, which give the BN reductions exactly) and recomputes the
# last conv in batch chunks during the backward, one extra conv forward in all (two where
# the pool keeps the resolution and the batch is cut into several chunks: one more pass
# then gives the BN reductions). A 1x1 last conv
# takes its BN statistics from the mean and covariance of its (narrower) input and is run
# chunk by chunk in the forward too, so its full z never exists at all.
# At the image resolution these encoders are memory-bound on a CPU, so the code counts
# passes over memory: BN+ReLU is one addcmul and one in-place relu, the BN backward writes
# dL/dz into the incoming gradient, and the ReLU mask is applied by threshold_backward
# against the ReLU output (a bool mask times a float tensor costs three times as much).
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


class PoolTo(nn.Module):
    """nn.AdaptiveAvgPool2d(side), computed by `pool_to`."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, h):
        return pool_to(h, self.side)


class ImageEncoder(nn.Module):
    """Enc_k(x): conv3x3(3->12)+BN+ReLU, conv3x3(12->C)+BN+ReLU, pooled to the feature side."""

    def __init__(self, channels: int, side: int, widen: float = 1.0):
        super().__init__()
        hidden = int(12 * widen)
        self.net = nn.Sequential(conv_bn_relu(3, hidden), conv_bn_relu(hidden, channels), PoolTo(side))
        self.side, self.impl = side, "lean"

    def forward(self, x):
        return _encoder_forward(self, x)


class ResidualEncoder(nn.Module):
    """ResEnc_{k,j}: conv1x1(C_in->C)+BN+ReLU, pooled to the feature side."""

    def __init__(self, c_in: int, channels: int, side: int):
        super().__init__()
        self.net = nn.Sequential(conv_bn_relu(c_in, channels, kernel=1), PoolTo(side))
        self.side, self.impl = side, "lean"

    def forward(self, h):
        return _encoder_forward(self, h)


CONTEXT_IMPLS = ("lean", "fused", "plain")


def _encoder_forward(enc, x):
    """plain: the nn.Sequential through autograd (the reference). lean (default) / fused: the
    same function through `encoder_chain`, used while training with gradients on."""
    if enc.impl == "plain" or not (enc.training and torch.is_grad_enabled()) \
            or torch.is_autocast_enabled(x.device.type):  # autograd handles autocast's casts
        return enc.net(x)
    layers = [(block[0], block[1]) for block in enc.net if isinstance(block, nn.Sequential)]
    if not all(bn.training for _, bn in layers):
        return enc.net(x)
    return encoder_chain(x, layers, enc.side, lean=enc.impl == "lean")


def set_context_impl(net: nn.Module, impl: str) -> nn.Module:
    """Choose how the context encoders of `net` run (the same function each way):
    lean (default) saves the least and recomputes the widest conv in the backward, fused keeps
    the pre-BN conv outputs (faster, more memory), plain is autograd on the nn.Sequential."""
    if impl not in CONTEXT_IMPLS:
        raise UsageError(f"unknown context implementation '{impl}'; choose one of: {', '.join(CONTEXT_IMPLS)}")
    for m in net.modules():
        if isinstance(m, (ImageEncoder, ResidualEncoder)):
            m.impl = impl
    return net


class ContextSupply(nn.Module):
    """The context added at cut k: Σ_j ResEnc_{k,j}(input of module k-j) [+ Enc_k(x)].

    `sources[i]` is the index of the module whose (detached) input feeds `residual[i]`;
    module 0's input is the image itself. Under RnE the image is covered by Enc_k, so no
    residual encoder reads it.
    """

    def __init__(self, cut: int, mode: ContextMode, input_shapes, out_shape, widen: float = 1.0):
        super().__init__()
        channels, side = out_shape
        self.image = ImageEncoder(channels, side, widen) if mode.image else None
        self.sources = [m for m in range(cut, cut - mode.n, -1) if m >= 0 and not (mode.image and m == 0)]
        self.residual = nn.ModuleList(ResidualEncoder(input_shapes[m][0], channels, side) for m in self.sources)

    def forward(self, x, module_inputs):
        ctx = self.image(x) if self.image is not None else 0
        for m, enc in zip(self.sources, self.residual):
            ctx = ctx + enc(module_inputs[m])
        return ctx


# --------------------------------------------------------------------------------------
# The whole model
@dataclass
class ModelConfig:
    arch: str = "resnet32"
    k: int = 4                      # number of local modules; 1 = end-to-end
    mode: str = "R1E"               # context supply
    loss: str = "softmax"           # local head loss: softmax | contrast
    head: str = "1c2f"              # auxiliary head config
    reconstruct: bool = False       # add the decoder's reconstruction loss
    loss_scales: tuple | None = None  # (ixx_1, ixy_1, ixx_2, ixy_2); None = the paper's
    balanced: bool = False          # memory-balanced cut points (E*)
    dataset: str = "cifar10"
    widen: float = 1.0
    context_impl: str = "lean"      # how the encoders run: lean | fused | plain (same function; see set_context_impl)

    def __post_init__(self):
        """Each field, then the combinations the paper's tables allow: a bad config fails
        here, in one line, before a network or a run folder exists."""
        check_model_fields(self)
        parse_mode(self.mode, self.k)
        tables.cut_points(self.arch, self.k, self.balanced, self.dataset)
        if self.reconstruct and self.loss_scales is None:
            tables.loss_scales(self.arch, self.dataset, self.k, self.balanced)


# The smallest hidden layer is 12*widen wide (decoder, image encoder); beyond 16x the heads
# and encoders outgrow the network they serve.
WIDEN_RANGE = (0.125, 16.0)


def check_model_fields(cfg) -> None:
    """Type and range of every ModelConfig field of `cfg` (a ModelConfig or a TrainConfig),
    each on its own; normalises numbers in place (loss_scales: a tuple of floats)."""
    for name in ("dataset", "arch", "mode", "loss", "head", "context_impl"):
        setattr(cfg, name, check_str(name, getattr(cfg, name)))
    tables.check_dataset(cfg.dataset)
    tables.check_arch(cfg.arch)
    cfg.k = check_int("k", cfg.k, 1)
    parse_mode(cfg.mode, None)
    if cfg.loss not in LOSSES:
        raise UsageError(f"unknown loss '{cfg.loss}'; choose one of: {', '.join(LOSSES)}")
    if cfg.head not in HEAD_CONFIGS:
        raise UsageError(f"unknown head config '{cfg.head}'; choose one of: {', '.join(HEAD_CONFIGS)}")
    if cfg.context_impl not in CONTEXT_IMPLS:
        raise UsageError(f"unknown context implementation '{cfg.context_impl}'; "
                         f"choose one of: {', '.join(CONTEXT_IMPLS)}")
    check_bool("reconstruct", cfg.reconstruct)
    check_bool("balanced", cfg.balanced)
    cfg.widen = check_float("widen", cfg.widen, WIDEN_RANGE[0], WIDEN_RANGE[1], low_open=False)
    if cfg.loss_scales is not None:
        scales = cfg.loss_scales
        if isinstance(scales, (str, bytes)) or not hasattr(scales, "__len__") or len(scales) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in scales):
            raise UsageError(f"--loss-scales takes four numbers, finite and >= 0: ixx_1,ixy_1,ixx_2,ixy_2; "
                             f"got {scales!r}")
        cfg.loss_scales = tuple(float(v) for v in scales)
        if not cfg.reconstruct:
            raise UsageError("--loss-scales weighs the reconstruction loss: add --reconstruct, or drop --loss-scales")


class ContSupNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        recipe = tables.check_dataset(cfg.dataset)
        if cfg.loss not in LOSSES:
            raise UsageError(f"unknown loss '{cfg.loss}'; choose one of: {', '.join(LOSSES)}")
        if cfg.k < 1:
            raise UsageError(f"K must be >= 1 (1 = end-to-end), got {cfg.k}")
        self.cfg, self.k = cfg, cfg.k
        self.cuts = tables.cut_points(cfg.arch, cfg.k, cfg.balanced, cfg.dataset)
        self.mode = parse_mode(cfg.mode, cfg.k)
        size = recipe.image_size

        # Split the flat layer list into K modules at the cut points.
        modules, current, self.module_labels = [], [], [[]]
        for label, layer in backbone_layers(cfg.arch):
            current.append(layer)
            self.module_labels[-1].append(label)
            if label in self.cuts:
                modules.append(nn.Sequential(*current))
                current = []
                self.module_labels.append([])
        modules.append(nn.Sequential(*current))
        self.blocks = nn.ModuleList(modules)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(tables.STAGE_WIDTHS[-1], recipe.num_classes))

        out_shapes = [feature_shape(stage, size) for stage, _ in self.cuts]  # output of module k
        in_shapes = [(3, size)] + out_shapes                                  # input of module k
        out_dim = recipe.num_classes if cfg.loss == "softmax" else FEATURE_DIM
        self.heads = nn.ModuleList(AuxHead(c, cfg.head, out_dim, cfg.widen) for c, _ in out_shapes)
        self.context = nn.ModuleList(ContextSupply(k, self.mode, in_shapes, out_shapes[k], cfg.widen)
                                     for k in range(len(self.cuts)))
        self.decoders = nn.ModuleList(Decoder(c, size, cfg.widen) for c, _ in out_shapes) \
            if cfg.reconstruct else nn.ModuleList()

        # (a, b): weights of the reconstruction and head losses at each cut.
        if cfg.reconstruct:
            scales = cfg.loss_scales or tables.loss_scales(cfg.arch, cfg.dataset, cfg.k, cfg.balanced)
            self.loss_weights = [tables.interpolate_scales(scales, c, cfg.k) for c in range(len(self.cuts))]
        else:
            self.loss_weights = [(0.0, 1.0)] * len(self.cuts)
        # How far back the residual context reaches: module inputs older than that are dropped.
        self.keep_inputs = max([max(0, c - min(s.sources)) for c, s in enumerate(self.context) if s.sources] or [0])
        self.reset_parameters()
        set_context_impl(self, cfg.context_impl)

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def supply(self, cut: int, h, x, module_inputs):
        """Input of module cut+1: the detached output of module `cut` plus its context.

        h: [B, C, H, W] output of module `cut`; x: [B, 3, S, S] image; module_inputs[m]: the
        detached input of module m (or None once no later cut needs it).
        """
        next_input = h.detach()
        if self.context[cut].image is not None or self.context[cut].sources:
            next_input = next_input + self.context[cut](x, module_inputs)
        # Free inputs no later cut reads (cut+1 reads back to cut+1-keep_inputs).
        for m in range(0, cut + 1 - self.keep_inputs):
            module_inputs[m] = None
        return next_input

    def forward(self, x):
        """Inference: the same composition as training, without the local losses."""
        module_inputs, h_in = [], x
        for k, block in enumerate(self.blocks):
            module_inputs.append(h_in.detach())
            h = block(h_in)
            if k < self.k - 1:
                h_in = self.supply(k, h, x, module_inputs)
        return self.classifier(h)

    def parts(self) -> dict[str, int]:
        """Parameter count of each part (backbone, heads, context encoders, decoders)."""
        count = lambda ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
        return {"backbone": count([self.blocks, self.classifier]), "local_heads": count([self.heads]),
                "context_encoders": count([self.context]), "decoders": count([self.decoders])}
