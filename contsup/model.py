"""The network: a CIFAR ResNet cut into K gradient-isolated local modules (METHOD §2-§4).

    image x ──> [module 0] ─h0─> (cut 0) ─> [module 1] ─h1─> (cut 1) ─> ... ─> [module K-1] ─> classifier
                     │                │                                         
                 local head 0     h0.detach() + Σ context encoders(...)   = input of module 1

Each module but the last ends in a small auxiliary head (`AuxHead`, and optionally a
reconstruction `Decoder`) that gives it a local loss. At every cut the next module's input
is the *detached* module output plus the context supply (`ContextSupply`): encoders of the
raw image (mode E) and/or of the inputs of the last n modules (mode Rn). The encoders are
trained by the next module's loss; no gradient ever crosses a cut. K=1 is plain end-to-end.

The K modules come as a `Backbone` (blocks and the activation shape at each cut): the
paper's ResNet split at its cut table (`paper_backbone`, the default), or any network
`contsup.wrap` cut with torch.fx (wrap.py). The heads and encoders are chosen and sized by
the shape at each cut (`local_head`, `context_encoder`, `decoder_for`): the paper's on
feature maps, tokens.py's on token sequences; the composition below is the same for both.

This file builds the modules and composes their inputs: `ContSupNet.run_modules` is the
loop over the modules, written once; inference runs it with the forward alone, the step
(`step.local_learning_step`) with a local loss and `loss.backward()` per module. The encoders here are the paper's plain ones;
`speed/encoders.py` can run the same function with less memory (the trainer's default on a CPU).
"""
from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from . import tables
from .errors import UsageError, check_bool, check_float, check_int, check_str, command_line, option
from .tokens import PatchEncoder, TokenDecoder, TokenEncoder, TokenHead, TokenLayout

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
# Local heads and decoders (METHOD §4)
class AuxHead(nn.Module):
    """Auxiliary head on a module output; config '<convs>c<fcs>f' (the paper's default: 1c2f).

    The paper's head by stage: on every stage but the last, the conv maps C->2C with stride
    2 (its 16->32 and 32->64), on the last it keeps C->C with stride 1 (its 64->64). A stage
    is told by its width, as ResNets double it at each downsampling: `last_width` is the
    backbone's last-stage width, its widest feature map (64 for the paper's networks, 512
    for a ResNet-18: a 64- or 128-wide map there strides, as the paper's 16 and 32 do); fc
    layers are FEATURE_DIM wide; `widen` scales the hidden widths. Outputs class logits
    (softmax) or a FEATURE_DIM embedding (contrast).
    """

    def __init__(self, channels: int, config: str, out_dim: int, widen: float = 1.0,
                 last_width: int = tables.STAGE_WIDTHS[-1]):
        super().__init__()
        if config not in HEAD_CONFIGS:
            raise UsageError(f"unknown head config '{config}'; choose one of: {', '.join(HEAD_CONFIGS)}")
        n_conv, n_fc = int(config[0]), int(config[2])
        layers, c = [], channels
        for i in range(n_conv):
            wide = channels >= last_width     # the last stage
            c_out = int(channels * widen) if wide else int(2 * channels * widen)
            stride = 1 if (wide or i > 0) else 2
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
# Context supply (METHOD §2)
@dataclass(frozen=True)
class ContextMode:
    """R<n> (residual context from the inputs of the last n modules) and/or E (image).

    What a mode means is decided here and nowhere else: the model, the cost of a run
    (`study.reproduce.proxy_cost`), the registry and the tables ask this class.
    """
    n: int
    image: bool

    @property
    def name(self) -> str:
        return ("E" if self.n == 0 else f"R{self.n}E") if self.image else f"R{self.n}"

    def fits(self, k: int) -> bool:
        """A network of K=k modules has the n module inputs this mode reads (R16 needs K=16)."""
        return self.n <= k

    def residual_sources(self, cut: int) -> list[int]:
        """The modules whose detached inputs feed cut `cut`'s residual encoders, newest first:
        the inputs of modules cut, cut-1, ..., cut-n+1 that exist. Module 0's input is the
        image, which under RnE the image encoder already covers."""
        return [m for m in range(cut, cut - self.n, -1) if m >= 0 and not (self.image and m == 0)]


_MODE_RE = re.compile(r"^(?:R(\d+)(E?)|E)$")


def parse_mode(mode: str, k: int | None) -> ContextMode:
    """The context mode `mode` of a network of K=k modules (k None: the spelling only)."""
    m = _MODE_RE.match(mode)
    if m is None:
        raise UsageError(f"unknown context mode '{mode}'; choose R0, E, Rn or RnE "
                         "(n = 1, 2, 4, ... up to K), e.g. R1E")
    parsed = ContextMode(int(m.group(1) or 0), mode == "E" or m.group(2) == "E")
    if k is not None and not parsed.fits(k):
        raise UsageError(f"mode {mode} needs context from {parsed.n} modules but K={k}; use K >= {parsed.n}")
    return parsed


# The paper's largest ratio of image side to feature side at a cut (CIFAR 32 -> 8, STL-10
# 96 -> 24): its image encoders run at the image's resolution up to it.
IMAGE_SIDE_RATIO = 4


class ImageEncoder(nn.Module):
    """Enc_k(x): conv3x3(3->12)+BN+ReLU, conv3x3(12->C)+BN+ReLU, pooled to the feature side.

    The convs run at the image's resolution, as the paper's, where the image side is at most
    IMAGE_SIDE_RATIO x the feature side (always so in the paper's networks); a larger image
    (`image_side`: a wrapped network whose features shrink faster, e.g. an ImageNet stem) is
    first average-pooled to that, so the encoder's C-channel map costs at most 16x the
    feature map's area rather than growing with the image."""

    def __init__(self, channels: int, side: int, widen: float = 1.0, image_side: int | None = None):
        super().__init__()
        hidden = int(12 * widen)
        limit = IMAGE_SIDE_RATIO * side
        self.pre = nn.AdaptiveAvgPool2d(limit) if image_side is not None and image_side > limit else nn.Identity()
        self.net = nn.Sequential(conv_bn_relu(3, hidden), conv_bn_relu(hidden, channels), nn.AdaptiveAvgPool2d(side))

    def forward(self, x):
        return self.net(self.pre(x))


class ResidualEncoder(nn.Module):
    """ResEnc_{k,j}: conv1x1(C_in->C)+BN+ReLU, pooled to the feature side."""

    def __init__(self, c_in: int, channels: int, side: int):
        super().__init__()
        self.net = nn.Sequential(conv_bn_relu(c_in, channels, kernel=1), nn.AdaptiveAvgPool2d(side))

    def forward(self, h):
        return self.net(h)


# --------------------------------------------------------------------------------------
# Heads and encoders by the shape of the activation at a cut (batch left out): a feature map
# (C, H, H) gets the paper's, a token sequence (N, D) those of tokens.py; nothing else has a rule.
def has_shape_rule(shape) -> bool:
    if len(shape) == 3:
        return shape[1] == shape[2]
    if len(shape) == 2:
        try:
            TokenLayout.of(shape)
        except UsageError:
            return False
        return True
    return False


def check_cut_shape(shape, where: str) -> None:
    if not has_shape_rule(shape):
        raise UsageError(f"no head or encoder rule for the activation [B, {', '.join(map(str, shape))}] {where}: "
                         "rules exist for square feature maps [B, C, H, H] and token sequences [B, g*g (+1), D]; "
                         "cut elsewhere")


def local_head(shape, config: str, out_dim: int, widen: float, last_width: int) -> nn.Module:
    """AuxHead on a feature map (`last_width`: the backbone's last-stage width); on tokens,
    TokenHead with the config's fc count."""
    if len(shape) == 3:
        return AuxHead(shape[0], config, out_dim, widen, last_width)
    return TokenHead(shape[1], int(config[2]), out_dim, int(FEATURE_DIM * widen))


def context_encoder(source, target, widen: float, image: bool) -> nn.Module:
    """The encoder from a module input of shape `source` (the image where `image`) to the
    shape `target` of the activation at a cut:
    map -> map: ImageEncoder (the image; pooled first to at most IMAGE_SIDE_RATIO x the
    target side) or ResidualEncoder (pooled to the target side);
    map -> tokens: PatchEncoder; tokens -> tokens of the same N: TokenEncoder;
    tokens -> map, or tokens -> another N: no rule, refused."""
    if len(target) == 3:
        if len(source) != 3:
            raise UsageError(f"no context rule from tokens {tuple(source)} to a feature map {tuple(target)}: "
                             "use a mode without residual context (E or R0) or cut elsewhere")
        if image:
            return ImageEncoder(target[0], target[1], widen, image_side=source[1])
        return ResidualEncoder(source[0], target[0], target[1])
    layout = TokenLayout.of(target)
    if len(source) == 3:
        return PatchEncoder(source[0], source[1], layout)
    if source[0] != layout.tokens:
        raise UsageError(f"no context rule from {source[0]} tokens to {layout.tokens} tokens: use a mode without "
                         "residual context (E or R0) or cut where the token count is the same")
    return TokenEncoder(source[1], layout.dim)


def decoder_for(shape, image_size: int, widen: float) -> nn.Module:
    """The paper's Decoder on a feature map; on tokens, on the patch tokens laid on their grid."""
    if len(shape) == 3:
        return Decoder(shape[0], image_size, widen)
    layout = TokenLayout.of(shape)
    return TokenDecoder(layout, Decoder(layout.dim, image_size, widen))


class ContextSupply(nn.Module):
    """The context added at cut k: Σ_j ResEnc_{k,j}(input of module k-j) [+ Enc_k(x)].

    `sources[i]` is the index of the module whose (detached) input feeds `residual[i]`;
    module 0's input is the image itself. Under RnE the image is covered by Enc_k, so no
    residual encoder reads it. `forward` takes exactly those inputs, in that order (a
    fixed-arity tuple: what torch.compile guards on does not grow with the cut).
    `input_shapes[m]`: the input shape of module m (batch left out); the output of module
    `cut` has the input shape of module cut+1.
    """

    def __init__(self, cut: int, mode: ContextMode, input_shapes, widen: float = 1.0):
        super().__init__()
        out_shape = input_shapes[cut + 1]
        self.image = context_encoder(input_shapes[0], out_shape, widen, image=True) if mode.image else None
        self.sources = mode.residual_sources(cut)
        self.residual = nn.ModuleList(context_encoder(input_shapes[m], out_shape, widen, image=False)
                                      for m in self.sources)

    def forward(self, x, inputs):
        """x: the image; inputs[i]: the detached input of module sources[i]."""
        ctx = self.image(x) if self.image is not None else 0
        for h, enc in zip(inputs, self.residual):
            ctx = ctx + enc(h)
        return ctx


# --------------------------------------------------------------------------------------
# The whole model
GIVEN = "given"   # the arch of a model handed to contsup.wrap as an object (not rebuilt from a name)
_ARCH_RE = re.compile(r"^(?:torchvision:[A-Za-z_]\w*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
ARCH_HELP = ("resnet32 or resnet110 (the paper's), torchvision:<name> (a torchvision classification model, "
             "e.g. torchvision:resnet18) or package.module:factory (called with num_classes)")


def is_paper_arch(arch: str) -> bool:
    return arch in tables.BLOCKS_PER_STAGE


def check_arch(arch: str) -> None:
    if not (is_paper_arch(arch) or arch == GIVEN or _ARCH_RE.match(arch)):
        raise UsageError(f"unknown arch '{arch}'; choose {ARCH_HELP}")


DEFAULT_K = 4   # K where neither -k nor --cuts sets it


@command_line
@dataclass
class ModelConfig:
    """The network; each field with its command-line help (errors.option)."""
    arch: str = option("resnet32", ARCH_HELP)
    k: int | None = option(None, f"number of local modules (1 = end-to-end; default {DEFAULT_K}, or with --cuts "
                                 "the names + 1)", flag="-k")
    cuts: str | tuple | None = option(None, "not the paper's archs: cut after these modules (names from "
                                      "model.named_modules()), e.g. layer1,layer3; K = names + 1 (-k: leave it out)")
    mode: str = option("R1E", "context supply: R0, E, Rn or RnE (n = 1, 2, 4, ... up to K), e.g. R1E")
    loss: str = option("softmax", f"local head loss: {' or '.join(LOSSES)}")
    head: str = option("1c2f", f"auxiliary head config: {' '.join(HEAD_CONFIGS)}")
    reconstruct: bool = option(False, "add the reconstruction decoder loss")
    loss_scales: tuple | None = option(None, "ixx_1,ixy_1,ixx_2,ixy_2 for --reconstruct (default: the paper's table; "
                                             "required for other archs)")
    balanced: bool = option(False, "memory-balanced cut points (the paper's E*; the paper's archs)")
    dataset: str = option("cifar10", f"one of {', '.join(tables.DATA_RECIPES)}")
    widen: float = option(1.0, "width multiplier of heads and encoders")

    def __post_init__(self):
        """Each field, then the combinations the paper's tables allow: a bad config fails
        here, in one line, before a network or a run folder exists."""
        check_model_fields(self)
        check_model_combination(self)


def check_model_combination(cfg) -> None:
    """Mode vs K; the paper's archs: their cut and loss-scale tables; other archs (cut by
    `wrap`): no paper table applies, so --balanced is refused and --reconstruct takes its
    --loss-scales from the command line."""
    parse_mode(cfg.mode, cfg.k)
    if is_paper_arch(cfg.arch):
        if cfg.cuts is not None:
            raise UsageError(f"--cuts is for torchvision:<name> or module:factory archs; {cfg.arch} cuts by -k "
                             "(and --balanced): drop --cuts")
        tables.cut_points(cfg.arch, cfg.k, cfg.balanced, cfg.dataset)
        if cfg.reconstruct and cfg.loss_scales is None:
            tables.loss_scales(cfg.arch, cfg.dataset, cfg.k, cfg.balanced)
        return
    if cfg.balanced:
        raise UsageError(f"--balanced picks the paper's memory-balanced cut table of resnet32/110; -k on {cfg.arch} "
                         "already balances activation memory (or name the cuts with --cuts): drop --balanced")
    if cfg.reconstruct and cfg.loss_scales is None:
        raise UsageError(f"--reconstruct on {cfg.arch} needs --loss-scales ixx_1,ixy_1,ixx_2,ixy_2 "
                         "(the paper's table covers its ResNets only), e.g. --loss-scales 5,1,0,1")


# The smallest hidden layer is 12*widen wide (decoder, image encoder); beyond 16x the heads
# and encoders outgrow the network they serve.
WIDEN_RANGE = (0.125, 16.0)


def check_model_fields(cfg) -> None:
    """Type and range of every ModelConfig field of `cfg` (a ModelConfig or a TrainConfig),
    each on its own; normalises in place (loss_scales: a tuple of floats; cuts: a tuple of
    names, and K = names + 1)."""
    for name in ("dataset", "arch", "mode", "loss", "head"):
        setattr(cfg, name, check_str(name, getattr(cfg, name)))
    tables.check_dataset(cfg.dataset)
    check_arch(cfg.arch)
    if cfg.k is not None:
        cfg.k = check_int("k", cfg.k, 1)
    check_cuts_field(cfg)
    if cfg.k is None:
        cfg.k = DEFAULT_K
    parse_mode(cfg.mode, None)
    if cfg.loss not in LOSSES:
        raise UsageError(f"unknown loss '{cfg.loss}'; choose one of: {', '.join(LOSSES)}")
    if cfg.head not in HEAD_CONFIGS:
        raise UsageError(f"unknown head config '{cfg.head}'; choose one of: {', '.join(HEAD_CONFIGS)}")
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


def check_cuts_field(cfg) -> None:
    """--cuts: module names (a tuple, or one comma-separated string); it sets K = names + 1,
    and a -k given beside it that disagrees is refused."""
    if cfg.cuts is None:
        return
    names = cfg.cuts.split(",") if isinstance(cfg.cuts, str) else cfg.cuts
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise UsageError(f"--cuts takes module names separated by commas, e.g. layer1,layer3; got {cfg.cuts!r}")
    cfg.cuts = tuple(names)
    if cfg.k is not None and cfg.k != len(names) + 1:
        raise UsageError(f"--cuts names {len(names)} cuts, so K={len(names) + 1}: drop -k {cfg.k}")
    cfg.k = len(names) + 1


@dataclass
class Backbone:
    """A network cut into K modules, as ContSupNet composes them: module k maps its input to
    module k+1's input; the last one's output goes through `classifier` (nn.Identity where
    the last module ends in the network's own classifier)."""
    blocks: list                # K nn.Modules
    classifier: nn.Module
    shapes: list                # the input shape of each module, batch left out: (3, S, S), then one per cut
    labels: list                # per module, what it holds: (stage, block) for the paper's, module names else
    cuts: list                  # the label of each cut
    num_classes: int
    image_size: int
    last_width: int             # the width of its last stage, its widest feature map (AuxHead's stride rule)
    keep_weights: bool = False  # True: reset_parameters leaves the backbone's weights as they were given


def paper_backbone(cfg: ModelConfig) -> Backbone:
    """The paper's CIFAR ResNet split into K modules at its cut table's points (METHOD §3)."""
    recipe = tables.DATA_RECIPES[cfg.dataset]   # cfg's fields were checked when it was made
    cuts, size = tables.cut_points(cfg.arch, cfg.k, cfg.balanced, cfg.dataset), recipe.image_size
    modules, current, labels = [], [], [[]]
    for label, layer in backbone_layers(cfg.arch):
        current.append(layer)
        labels[-1].append(label)
        if label in cuts:
            modules.append(nn.Sequential(*current))
            current = []
            labels.append([])
    modules.append(nn.Sequential(*current))
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(tables.STAGE_WIDTHS[-1], recipe.num_classes))
    shapes = [(3, size, size)] + [(c, s, s) for c, s in (feature_shape(stage, size) for stage, _ in cuts)]
    return Backbone(modules, classifier, shapes, labels, cuts, recipe.num_classes, size,
                    last_width=tables.STAGE_WIDTHS[-1])


class ContSupNet(nn.Module):
    """K modules (`backbone`: the paper's ResNet by default, or any network `contsup.wrap`
    cut), a local head (and decoder) at each cut and the context supply, all sized from the
    shapes at the cuts (`local_head`, `context_encoder`, `decoder_for`)."""

    def __init__(self, cfg: ModelConfig, backbone: Backbone | None = None):
        super().__init__()
        if backbone is None:
            if not is_paper_arch(cfg.arch):
                raise UsageError(f"{cfg.arch} is built by contsup.wrap.build_net(cfg), or wrap the model itself "
                                 "with contsup.wrap(model, cuts, image_size=...)")
            backbone = paper_backbone(cfg)
        self.cfg, self.k = cfg, len(backbone.blocks)
        if self.k != cfg.k:
            raise ValueError(f"the backbone has {self.k} modules, the config says K={cfg.k}")
        self.cuts, self.module_labels, self.shapes = backbone.cuts, backbone.labels, list(backbone.shapes)
        self.image_size, self.num_classes, self.keep_weights = backbone.image_size, backbone.num_classes, \
            backbone.keep_weights
        self.mode = parse_mode(cfg.mode, cfg.k)
        self.blocks, self.classifier = nn.ModuleList(backbone.blocks), backbone.classifier

        out_shapes = self.shapes[1:]                                   # output of module k = input of module k+1
        for cut, shape in enumerate(out_shapes):
            check_cut_shape(shape, f"at cut {cut} ({self.cuts[cut]})")
        out_dim = self.num_classes if cfg.loss == "softmax" else FEATURE_DIM
        self.heads = nn.ModuleList(local_head(s, cfg.head, out_dim, cfg.widen, backbone.last_width)
                                   for s in out_shapes)
        self.context = nn.ModuleList(ContextSupply(k, self.mode, self.shapes, cfg.widen)
                                     for k in range(len(self.cuts)))
        self.decoders = nn.ModuleList(decoder_for(s, self.image_size, cfg.widen) for s in out_shapes) \
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

    def reset_parameters(self):
        """The paper's initialisation (METHOD §3) of every conv and BN; of a network given to
        `wrap` (keep_weights), only of the parts ContSup adds (heads, encoders, decoders)."""
        parts = [self.heads, self.context, self.decoders] if self.keep_weights else [self]
        for m in (m for part in parts for m in part.modules()):
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def supply(self, cut: int, h, x, module_inputs):
        """Input of module cut+1: the detached output of module `cut` plus its context.

        h: [B, C, H, W] (or tokens [B, N, D]) output of module `cut`; x: [B, 3, S, S] image; module_inputs[m]: the
        detached input of module m (or None once no later cut needs it).
        """
        next_input, context = h.detach(), self.context[cut]
        if context.image is not None or context.sources:
            next_input = next_input + context(x, tuple(module_inputs[m] for m in context.sources))
        # Free inputs no later cut reads (cut+1 reads back to cut+1-keep_inputs).
        for m in range(0, cut + 1 - self.keep_inputs):
            module_inputs[m] = None
        return next_input

    def run_modules(self, x, run_module, modules=None, h=None, inputs=None, precision=nullcontext):
        """The loop over the modules (METHOD §1-§2), written only here: for each module k, its
        input h_in (the image for module 0, else supply(k-1): module k-1's output h, detached,
        plus context), then h = run_module(k, h_in). `run_module` is the forward alone
        (inference: `module_forward`) or forward, local loss and backward (`step.module_step`).
        Returns the last module's output.

        `modules` (default: all K) may start later: a pipeline stage passes the previous
        stage's output `h` and the detached `inputs` of the modules before its own (None where
        no later cut reads one); `inputs` grows by each module's input. `precision()` is the
        context each supply runs in (the step's autocast)."""
        inputs = [] if inputs is None else inputs
        for k in range(self.k) if modules is None else modules:
            if k == 0:
                h_in = x                                               # [B, 3, S, S]
            else:
                with precision():
                    h_in = self.supply(k - 1, h, x, inputs)           # h.detach() + context
                h = None  # module k-1's output is not needed any more (frees it where h_in is a new tensor)
            inputs.append(h_in.detach())
            h = run_module(k, h_in)
        return h

    def module_forward(self, k: int, h_in):
        """Module k's forward; the last module ends in the classifier (class logits)."""
        h = self.blocks[k](h_in)                                       # [B, C_k, H_k, W_k] or [B, N, D]
        return self.classifier(h) if k == self.k - 1 else h           # [B, classes]

    def forward(self, x):
        """Inference: the same composition as training, without the local losses."""
        return self.run_modules(x, self.module_forward)

    def parts(self) -> dict[str, int]:
        """Parameter count of each part (backbone, heads, context encoders, decoders)."""
        count = lambda ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
        return {"backbone": count([self.blocks, self.classifier]), "local_heads": count([self.heads]),
                "context_encoders": count([self.context]), "decoders": count([self.decoders])}
