"""`--compile` compiles: every part of a K=16 network gets a graph of its own, and a second
training step runs them all without one recompile (no part falls back to eager at dynamo's
recompile limit). backend="eager" checks dynamo's capture and guards without inductor's
CPU compile time."""
import copy

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from contsup.model import ContSupNet, ModelConfig
from contsup.speed.encoders import set_context_impl
from contsup.step import local_learning_step
from contsup.speed.setup import compile_model


def test_compiled_k16_step_has_one_graph_per_part_and_no_recompile():
    torch.manual_seed(0)
    net = ContSupNet(ModelConfig(arch="resnet32", k=16, mode="R1E", dataset="digits8")).train()
    ref = set_context_impl(copy.deepcopy(net), "plain")
    keys = list(net.state_dict())
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    torch._dynamo.reset()
    counters.clear()
    compile_model(net, backend="eager")
    parts = [*net.blocks, *net.heads, net.classifier, *[c for c in net.context if c.image is not None or c.sources]]
    assert len(parts) == 16 + 15 + 1 + 15

    _, losses = local_learning_step(net, x, y)
    assert counters["frames"]["total"] == counters["frames"]["ok"] == len(parts)  # each part: one frame, ...
    assert counters["stats"]["unique_graphs"] == len(parts)                       # ... one graph, no graph break
    assert not any("recompile" in reason.lower() or "cache_size" in reason for reason in counters["unimplemented"])
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises here
        net.zero_grad(set_to_none=True)
        local_learning_step(net, x, y)
    assert counters["frames"]["total"] == len(parts) and counters["stats"]["unique_graphs"] == len(parts)

    _, losses_ref = local_learning_step(ref, x, y)  # the same first step, uncompiled
    torch.testing.assert_close(losses, losses_ref)
    assert list(net.state_dict()) == keys
