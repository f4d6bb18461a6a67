"""ContSup on any backbone: `wrap` cuts a model the user already has into K modules with
torch.fx and returns the same `ContSupNet` the paper's ResNets are.

    net = contsup.wrap(torchvision.models.resnet18(num_classes=10), cuts=4, image_size=32)
    logits, losses = step.local_learning_step(net, x, y)       # as for the paper's networks

How a model is cut (the rules; METHOD §9 repeats them):

1. The model is copied (the caller's model is left as it is, weights included) and traced
   with `torch.fx.symbolic_trace` in eval mode (see `trace`; an `nn.Sequential` traces as its
   children in order); its graph runs once on a zero image [2, 3, S, S] for the
   shapes. The net comes back in the mode the model was in.
2. A cut can go after a node of the graph where exactly one value crosses: one tensor made
   before it is read after it, nothing else (no second tensor, as inside a residual block,
   nor a number such as a batch size read from the input's shape). Parameters read by
   `get_attr` do not count: each piece reads its own. The tensor must have a rule (below).
3. `cuts` as an int K: K-1 of those places (those at the end of a block, a module with
   submodules, where the model has K-1 of them; else any), balanced by activation memory, as the paper's
   E*: the bytes of every value the graph makes between two cuts are summed, and the cuts
   minimise the largest sum (exactly, by dynamic programming over the places). Memory, not
   FLOPs, because a step keeps one module's activations alive at a time: the largest
   module's sets the step's peak, which is what local learning is for.
4. `cuts` as a list of names from `model.named_modules()`: the cut goes after the last node
   the module (or anything inside it) runs. A name where the cut is not one of the places of
   2 (inside a residual block) is refused in one line naming the nearest valid places; an
   unknown name, a name out of forward order, and K beyond the number of places (one line:
   the maximum) too. A place no module ends at is named by its fx node (e.g. `flatten`).
5. Each piece is an `fx.GraphModule` holding the model's own submodules and parameters
   (state_dict keys `blocks.<k>.<the model's name>`; a weight two pieces would share, as a
   module called on both sides of a cut, is refused); the last piece ends in the model's own
   classifier, so `ContSupNet.classifier` is an identity. Nothing in the backbone is
   re-initialised (`Backbone.keep_weights`): only the heads, encoders and decoders ContSup
   adds are. In eval mode under R0 the net computes the model's own ops in the same order.
6. Heads and encoders come from the shape at each cut (`model.local_head`,
   `model.context_encoder`, `model.decoder_for`): a square feature map [B, C, H, H] gets the
   paper's AuxHead / ImageEncoder / ResidualEncoder / Decoder, a token sequence [B, N, D]
   (N = g*g patches, after one class token or none) the token head and encoders of
   `tokens.py`; any other shape has no rule and is no place to cut.

`build_net(cfg)` builds the network a `ModelConfig` names: the paper's ResNets directly,
`torchvision:<name>` and `package.module:factory` (called with `num_classes`) through `wrap`.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from . import tables
from .errors import UsageError
from .model import GIVEN, Backbone, ContSupNet, ModelConfig, has_shape_rule, is_paper_arch


@dataclass
class Place:
    """A place to cut: after graph position `pos`, where only `value` crosses."""
    pos: int
    value: fx.Node
    name: str
    block: bool = False   # a module with submodules ends here (a block, a stage)
    module: bool = False  # named after a module (else after its fx node)


@dataclass(frozen=True)
class TensorMeta:
    shape: torch.Size
    dtype: torch.dtype


class _RecordShapes(fx.Interpreter):
    """Runs the graph once, recording each tensor value's shape (node.meta['tensor_meta'])."""

    def run_node(self, n):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = TensorMeta(result.shape, result.dtype)
        return result


def trace(model: nn.Module, image_size: int) -> fx.GraphModule:
    """A traced copy of `model` in eval mode, its nodes annotated with shapes
    (`node.meta['tensor_meta']`). Eval mode, because fx bakes forward code that reads
    `self.training` itself into the graph: traced in training mode, torchvision's stochastic
    depth would drop paths at test time too. Modules (BN, dropout) still follow the train and
    eval modes; such code keeps its eval branch (no stochastic depth, no GoogLeNet/Inception aux
    logits, whose role the local heads take)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"wrap takes an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, NotImplementedError ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"torch.fx cannot trace {type(model).__name__} ({first}); wrap a model fx can trace "
                         "or an nn.Sequential") from e
    param = next(model.parameters(), None)
    example = torch.zeros(2, 3, image_size, image_size, device=param.device if param is not None else None)
    try:
        with torch.no_grad():
            _RecordShapes(gm).run(example)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{type(model).__name__} does not run on a [2, 3, {image_size}, {image_size}] image "
                         f"({first}); build it for that size (or give the image_size it takes)") from e
    return gm


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape[1:]) if hasattr(meta, "shape") else None


def _module_path(node: fx.Node) -> str:
    """The qualified name of the innermost module that runs `node` ('' for the model's own code)."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return last[0] if isinstance(last, tuple) else str(last)


def crossing(nodes: list) -> list[set]:
    """For each position i, the values made at or before i that a node after i reads
    (get_attr values left out: a piece reads its own parameters)."""
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=-1) for n in nodes}
    alive, out = set(), []
    for i, n in enumerate(nodes):
        if n.op != "get_attr" and last_use[n] > i:
            alive.add(n)
        alive = {v for v in alive if last_use[v] > i}
        out.append(set(alive))
    return out


def module_ends(nodes: list) -> dict[str, int]:
    """The position of the last node each module runs (itself or anything inside it)."""
    ends = {}
    for i, n in enumerate(nodes):
        path = _module_path(n)
        parts = path.split(".") if path else []
        for j in range(1, len(parts) + 1):
            ends[".".join(parts[:j])] = i
    return ends


def places(nodes: list, alive: list, ends: dict, blocks: set) -> list[Place]:
    """The places to cut, in forward order: the first position where exactly one value, a
    tensor with a shape rule, crosses (one place per value), short of the last compute node;
    named by the shortest module name that ends where that value crosses alone."""
    last_compute = max(i for i, n in enumerate(nodes) if n.op not in ("output", "placeholder", "get_attr"))
    found: dict[fx.Node, Place] = {}
    for i, live in enumerate(alive[:last_compute]):
        if len(live) != 1:
            continue
        (value,) = live
        shape = _shape(value)
        if value.op == "placeholder" or shape is None or not has_shape_rule(shape) or value in found:
            continue
        found[value] = Place(i, value, value.name)
    names: dict[fx.Node, list] = {}
    for name, pos in ends.items():
        if pos < len(alive) and len(alive[pos]) == 1 and next(iter(alive[pos])) in found:
            names.setdefault(next(iter(alive[pos])), []).append(name)
    for value, place in found.items():
        if value in names:
            place.name = min(names[value], key=lambda s: (s.count("."), len(s)))
            place.block, place.module = any(n in blocks for n in names[value]), True
    return sorted(found.values(), key=lambda p: p.pos)


def balanced(costs: list[int], candidates: list[int], k: int) -> list[int]:
    """K-1 of the `candidates` positions cutting `costs` (one per node) into K runs whose
    largest sum is the least (dynamic programming; ties: the earlier cut)."""
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    total = prefix[-1]
    seg = lambda a, b: prefix[b + 1] - prefix[a + 1]  # noqa: E731  nodes a+1..b
    best = [(prefix[c + 1], None) for c in candidates]   # one cut: the first run ends at c
    table = [best]
    for _ in range(k - 2):
        prev, best = best, []
        for j, c in enumerate(candidates):
            options = [(max(prev[i][0], seg(candidates[i], c)), i) for i in range(j)]
            best.append(min(options) if options else (float("inf"), None))
        table.append(best)
    score = [(max(v, total - prefix[c + 1]), j) for j, ((v, _), c) in enumerate(zip(best, candidates))]
    j = min(score)[1]
    chosen = []
    for row in reversed(table):
        chosen.append(candidates[j])
        j = row[j][1]
    return chosen[::-1]


def _nearest(found: list[Place], pos: int) -> str:
    found = [p for p in found if p.module] or found
    before = [p.name for p in found if p.pos < pos][-1:]
    after = [p.name for p in found if p.pos > pos][:1]
    return " or ".join(f"'{n}'" for n in before + after) or "none"


def named_places(found: list[Place], names, nodes: list, alive: list, ends: dict, what: str) -> list[Place]:
    """The places after the modules `names` (or fx node names), each checked (see the module doc)."""
    by_node = {n.name: i for i, n in enumerate(nodes)}
    chosen = []
    for name in names:
        pos = ends.get(name, by_node.get(name))
        if pos is None:
            some = ", ".join(p.name for p in found[:6])
            raise UsageError(f"no module '{name}' runs in {what}'s forward; places to cut: {some} ...")
        place = next((p for p in found if len(alive[pos]) == 1 and p.value in alive[pos]), None)
        if place is None:
            shapes = [_shape(v) for v in alive[pos]]
            why = f"{len(shapes)} values cross there (inside a residual block)" if len(shapes) != 1 else \
                f"the tensor there, [B, {', '.join(map(str, shapes[0] or ()))}], has no head or encoder rule"
            raise UsageError(f"cannot cut after '{name}': {why}; the nearest places: {_nearest(found, pos)}")
        if chosen and place.pos <= chosen[-1].pos:
            raise UsageError(f"cut '{name}' is not after cut '{chosen[-1].name}': give the cuts in forward order, "
                             "each after the last")
        chosen.append(Place(pos, place.value, name))
    return chosen


def choose_places(gm: fx.GraphModule, cuts, what: str) -> tuple[list, list[Place]]:
    """The graph's nodes and the K-1 places `cuts` (an int K, or module names) asks for."""
    nodes = list(gm.graph.nodes)
    alive, ends = crossing(nodes), module_ends(nodes)
    found = places(nodes, alive, ends, {name for name, m in gm.named_modules() if name and next(m.children(), None)})
    if isinstance(cuts, int) and not isinstance(cuts, bool):
        if cuts < 1:
            raise UsageError(f"cuts=K must be >= 1, got {cuts}")
        if cuts - 1 > len(found):
            raise UsageError(f"{what} has {len(found)} places where one tensor crosses: at most K={len(found) + 1}")
        if cuts == 1:
            return nodes, []
        costs, at_blocks = [_bytes(n) for n in nodes], [p for p in found if p.block]
        pool = at_blocks if len(at_blocks) >= cuts - 1 else found
        chosen = set(balanced(costs, [p.pos for p in pool], cuts))
        return nodes, [p for p in pool if p.pos in chosen]
    names = [cuts] if isinstance(cuts, str) else cuts
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"cuts is an int K or a list of module names, got {cuts!r}")
    return nodes, named_places(found, names, nodes, alive, ends, what)


def widest_map(nodes: list) -> int:
    """The channels of the widest square feature map [B, C, H, H] the graph computes: its
    last stage's width in a CNN that widens as it downsamples (AuxHead's stride rule);
    0 where it computes none (tokens only after the patch embedding have their own heads)."""
    return max((shape[0] for shape in map(_shape, nodes) if shape is not None and len(shape) == 3
                and shape[1] == shape[2]), default=0)


def _bytes(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    if node.op in ("placeholder", "get_attr", "output") or not hasattr(meta, "shape"):
        return 0
    return meta.shape.numel() * meta.dtype.itemsize


def piece(gm: fx.GraphModule, nodes: list, span: tuple[int, int], given: fx.Node | None, out: fx.Node | None):
    """The nodes at positions span[0]+1 .. span[1] as a GraphModule: its input is `given`
    (None: the model's own input), its output `out` (None: the model's own output).
    Parameters read by get_attr are read in the piece that uses them."""
    graph, env = fx.Graph(), {}

    def value(n):
        if n not in env and n.op == "get_attr":
            env[n] = graph.get_attr(n.target)
        return env[n]

    if given is not None:
        env[given] = graph.placeholder(given.name)
    for n in nodes[span[0] + 1:span[1] + 1]:
        if n.op == "get_attr" or (n.op == "placeholder" and given is not None):
            continue
        if n.op == "output" and out is not None:
            continue
        env[n] = graph.node_copy(n, value)
    if out is not None:
        graph.output(env[out])
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=f"Piece{span[0] + 1}")


def split(gm: fx.GraphModule, nodes: list, chosen: list[Place]) -> tuple[list, list]:
    """The K pieces and, per piece, the modules it calls (its labels)."""
    bounds = [-1] + [p.pos for p in chosen] + [len(nodes) - 1]
    values = [None] + [p.value for p in chosen] + [None]
    blocks = [piece(gm, nodes, (bounds[t], bounds[t + 1]), values[t], values[t + 1]) for t in range(len(chosen) + 1)]
    labels = [[n.target for n in nodes[bounds[t] + 1:bounds[t + 1] + 1] if n.op == "call_module"]
              for t in range(len(blocks))]
    owner: dict[int, int] = {}
    for t, block in enumerate(blocks):
        for name, p in block.named_parameters():
            if owner.setdefault(id(p), t) != t:   # a weight two modules use: its gradient would cross the cut
                raise UsageError(f"parameter '{name}' is used by modules {owner[id(p)]} and {t}; a weight shared "
                                 "across a cut carries gradient across it: cut elsewhere")
    return blocks, labels


def wrap(model: nn.Module, cuts, *, mode: str = "R1E", loss: str = "softmax", image_size: int,
         num_classes: int | None = None, head: str = "1c2f", widen: float = 1.0, reconstruct: bool = False,
         loss_scales=None, arch: str = GIVEN, dataset: str = "cifar10") -> ContSupNet:
    """`model` (an fx-traceable classification nn.Module or an nn.Sequential, on images
    [B, 3, image_size, image_size]) cut into K gradient-isolated modules with context supply.

    cuts: an int K, or names from `model.named_modules()` (the cut goes after each). A cut
    goes only where exactly one tensor crosses (not inside a residual block); with an int,
    K-1 such places (block ends where there are enough) balanced by activation memory, as
    the paper's E*: the largest module's activations set a local step's peak. Refused in
    one line: a named cut inside a residual block (naming the nearest valid places), an
    unknown name, names out of order, K above the number of places (naming the maximum).
    Heads and encoders by the shape at a cut: a square feature map [B, C, H, H] gets the
    paper's AuxHead (its conv strides on maps narrower than the model's widest, as on the
    paper's stages before the last), ImageEncoder (the image pooled to at most 4H first), ResidualEncoder
    (pooled to H) and Decoder; tokens
    [B, N, D] with N = g*g (+1 class token, first) get TokenHead (LayerNorm, mean over
    tokens, MLP), PatchEncoder for the image or an earlier map (patch conv to the g*g
    tokens; the class token gets zero context), TokenEncoder (a linear map per token,
    class token included) for earlier tokens of the same N; tokens -> map or another N,
    and any other shape, have no rule (refused). The rules in full: the module doc.

    The model is not changed: the net holds a copy of it, no weight re-initialised (only
    the heads, encoders and decoders are new); in eval mode under R0, net(x) == model(x)
    bit for bit on a CPU. num_classes: checked against the model's output width where
    given. `arch`/`dataset` only name the network in its config (`build_net` passes them).
    """
    gm = trace(model, image_size)
    what = type(model).__name__
    nodes, chosen = choose_places(gm, cuts, what)
    result = nodes[-1].args[0]                                        # the output node's value
    out_shape = _shape(result) if isinstance(result, fx.Node) else None
    if out_shape is None or len(out_shape) != 1:
        raise UsageError(f"{what} does not return class logits [B, classes]; wrap a classification model")
    if num_classes is not None and num_classes != out_shape[0]:
        raise UsageError(f"{what} returns {out_shape[0]} logits, not num_classes={num_classes}: build it with "
                         f"{num_classes} classes")
    names = [p.name for p in chosen]
    cfg = ModelConfig(arch=arch, k=len(chosen) + 1, cuts=tuple(names) if names and not isinstance(cuts, int) else None,
                      mode=mode, loss=loss, head=head, reconstruct=reconstruct, loss_scales=loss_scales,
                      dataset=dataset, widen=widen)
    blocks, labels = split(gm, nodes, chosen)
    shapes = [(3, image_size, image_size)] + [_shape(p.value) for p in chosen]
    net = ContSupNet(cfg, Backbone(blocks, nn.Identity(), shapes, labels, names, out_shape[0], image_size,
                                   last_width=widest_map(nodes), keep_weights=True))
    return net.train(model.training)   # the mode the model was in (it was traced in eval mode)


def make_model(arch: str, num_classes: int) -> nn.Module:
    """The model `arch` names: torchvision:<name> (weights=None) or package.module:factory."""
    where, _, name = arch.partition(":")
    if where == "torchvision":
        import torchvision
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise UsageError(f"torchvision has no classification model '{name}'; e.g. "
                             f"{', '.join(k for k in known if k.startswith(('resnet', 'vit', 'mobilenet')))}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:
        factory = getattr(importlib.import_module(where), name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"cannot import {name} from {where} ({e}); --arch package.module:factory names an "
                         "importable function") from e
    model = factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{arch}(num_classes={num_classes}) returned {type(model).__name__}, not an nn.Module")
    return model


def build_net(cfg: ModelConfig) -> ContSupNet:
    """The network `cfg` names: the paper's ResNets as ContSupNet(cfg), other archs by `wrap`."""
    if is_paper_arch(cfg.arch):
        return ContSupNet(cfg)
    if cfg.arch == GIVEN:
        raise UsageError(f"arch '{GIVEN}' is a model handed to contsup.wrap; to build one from its name use "
                         "--arch torchvision:<name> or --arch package.module:factory")
    recipe = tables.DATA_RECIPES[cfg.dataset]
    model = make_model(cfg.arch, recipe.num_classes)
    return wrap(model, list(cfg.cuts) if cfg.cuts is not None else cfg.k, mode=cfg.mode, loss=cfg.loss,
                image_size=recipe.image_size, num_classes=recipe.num_classes, head=cfg.head, widen=cfg.widen,
                reconstruct=cfg.reconstruct, loss_scales=cfg.loss_scales, arch=cfg.arch, dataset=cfg.dataset)
