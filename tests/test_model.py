"""The method itself: gradient isolation, context wiring, eval == train forward."""
import pytest
import torch

from contsup.errors import UsageError
from contsup.model import ContSupNet, ModelConfig, parse_mode
from contsup.step import local_learning_step


def batch(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % 4  # every class twice: SupCon has positives
    return x, y, torch.rand(x.shape, generator=g)


def params_of(*modules):
    return {id(p) for m in modules if m is not None for p in m.parameters()}


def touched_per_module(net, x, y, image):
    """Run the real training step, and record after each module's backward which parameters
    have received gradient since the previous module (a pre-hook on the next module fires
    right after the previous module's backward)."""
    net.zero_grad(set_to_none=True)
    seen, per_module = {}, []

    def snapshot():
        now = {id(p): p.grad.clone() for p in net.parameters() if p.grad is not None}
        new = {i for i, g in now.items() if i not in seen or not torch.equal(g, seen[i])}
        seen.clear(), seen.update(now)
        per_module.append(new)

    hooks = [b.register_forward_pre_hook(lambda *_: snapshot()) for b in net.blocks[1:]]
    local_learning_step(net, x, y, image)
    snapshot()
    for h in hooks:
        h.remove()
    return per_module


@pytest.mark.parametrize("mode,loss,reconstruct", [("R0", "softmax", False), ("R1E", "softmax", True),
                                                   ("R2E", "contrast", False), ("R4", "softmax", False)])
def test_no_gradient_crosses_a_cut(mode, loss, reconstruct):
    net = ContSupNet(ModelConfig(arch="resnet32", k=4, mode=mode, loss=loss, reconstruct=reconstruct,
                                 loss_scales=(1, 1, 1, 1) if reconstruct else None))
    x, y, image = batch()
    touched = touched_per_module(net, x, y, image)
    assert len(touched) == 4
    for k in range(4):
        last = k == 3
        expected = params_of(net.blocks[k],
                             net.classifier if last else net.heads[k],
                             None if last or not reconstruct else net.decoders[k],
                             net.context[k - 1] if k > 0 else None)
        # module k's loss reaches exactly: module k, its head (+decoder), the encoders of cut k-1
        assert touched[k] == expected, f"module {k}"
    if mode != "R0":  # the context encoders really are trained (by the next module's loss)
        assert params_of(net.context[0]) and params_of(net.context[0]) <= touched[1]


def test_context_sources_follow_the_mode():
    net = ContSupNet(ModelConfig(arch="resnet32", k=8, mode="R4E"))
    assert [c.sources for c in net.context] == [[], [1], [2, 1], [3, 2, 1], [4, 3, 2, 1], [5, 4, 3, 2], [6, 5, 4, 3]]
    assert all(c.image is not None for c in net.context)
    r1 = ContSupNet(ModelConfig(arch="resnet32", k=4, mode="R1"))
    assert [c.sources for c in r1.context] == [[0], [1], [2]] and r1.context[0].image is None
    r0 = ContSupNet(ModelConfig(arch="resnet32", k=4, mode="R0"))
    assert r0.parts()["context_encoders"] == 0


def test_context_changes_the_next_input_and_only_adds():
    """next_input = h.detach() + Σ encoders: zero the encoders' last BN and context vanishes."""
    net = ContSupNet(ModelConfig(arch="resnet32", k=4, mode="R1E")).eval()
    x, _, _ = batch()
    h = net.blocks[0](x)
    with torch.no_grad():
        with_ctx = net.supply(0, h, x, [x])
        for m in net.context[0].modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.zero_(), m.bias.zero_()
        without = net.supply(0, h, x, [x])
    assert not torch.allclose(with_ctx, h) and torch.equal(without, h)


@pytest.mark.parametrize("mode", ["R0", "R1E", "R16"])
def test_eval_forward_equals_training_forward(mode):
    net = ContSupNet(ModelConfig(arch="resnet32", k=16, mode=mode))
    x, y, _ = batch()
    net.eval()  # BN in eval mode: both paths see the same weights and statistics
    train_logits, losses = local_learning_step(net, x, y)
    with torch.no_grad():
        eval_logits = net(x)
    assert len(losses) == 16 and torch.isfinite(losses).all()
    torch.testing.assert_close(train_logits, eval_logits, rtol=0, atol=0)


def test_modes_parse_and_reject():
    assert parse_mode("R1E", 4).name == "R1E" and parse_mode("E", 2).image and parse_mode("R8", 8).n == 8
    for bad, k in [("R3X", 4), ("e", 4), ("R16", 8), ("R2", 1)]:
        with pytest.raises(UsageError):
            parse_mode(bad, k)


def test_head_configs_build_and_reject():
    for head in ["0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f"]:
        net = ContSupNet(ModelConfig(arch="resnet32", k=4, mode="R0", head=head, loss="contrast"))
        out = net.heads[0](torch.randn(2, 16, 32, 32))
        assert out.shape == (2, 128)
    with pytest.raises(UsageError, match="1c2f"):
        ContSupNet(ModelConfig(head="3c3f"))
    # 1c2f: conv 16->32 stride 2, fc 32->128->10 (METHOD §4)
    head = ContSupNet(ModelConfig(arch="resnet32", k=4, mode="R0")).heads[0].net
    assert head[0][0].out_channels == 32 and head[0][0].stride == (2, 2) and head[-1].out_features == 10
