"""contsup.wrap: any fx-traceable classification model cut into ContSup modules.

Small models and 32x32 images keep the CPU time down; torchvision's models are built with
weights=None (nothing is downloaded)."""
import copy
import json

import torch._dynamo
from torch._dynamo.utils import counters

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

import contsup
from contsup import UsageError
from contsup.cli import main
from contsup.model import ModelConfig
from contsup.speed.encoders import encoder_impls, set_context_impl
from contsup.step import local_learning_step, module_step
from contsup.train import compile_model
from contsup.tokens import PatchEncoder, TokenLayout
from contsup.wrap import build_net


def small_vit():
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.02)   # torchvision starts it at zero: no gradient to the tokens
    return vit


def small_sequential():
    def cbr(c_in, c_out, stride=1):
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*cbr(3, 8), *cbr(8, 16, 2), *cbr(16, 16), *cbr(16, 32, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


FAMILIES = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "vgg11": lambda: torchvision.models.vgg11(num_classes=10),
    "vit": small_vit,
    "sequential": small_sequential,
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: make().eval() for name, make in FAMILIES.items()}


def batch(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_r0_in_eval_mode_is_the_model_bit_for_bit(models, family):
    model = models[family]
    x, _ = batch()
    with torch.no_grad():
        ref = model(x)
        for k in (1, 2, 4):
            net = contsup.wrap(model, cuts=k, mode="R0", image_size=32).eval()
            assert net.k == k and len(net.cuts) == k - 1
            assert torch.equal(net(x), ref), (family, k, net.cuts)


@pytest.mark.parametrize("family", ["resnet18", "vit", "sequential"])
def test_weights_are_kept_and_the_model_is_left_as_it_was(models, family):
    model = models[family]
    before = copy.deepcopy(model.state_dict())
    net = contsup.wrap(model, cuts=3, image_size=32)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)        # the caller's model: untouched
    ours = {}
    for block in net.blocks:
        ours.update(block.state_dict())
    assert set(ours) == set(before)                                      # every weight, under its own name
    assert all(torch.equal(ours[k], before[k]) for k in before)
    net.reset_parameters()                                               # only heads/encoders/decoders
    assert all(torch.equal(v, before[k]) for b in net.blocks for k, v in b.state_dict().items())
    assert net.parts()["backbone"] == sum(p.numel() for p in model.parameters())


def test_named_cuts_and_shapes(models):
    net = contsup.wrap(models["resnet18"], cuts=["layer1", "layer2", "layer3"], image_size=32)
    assert net.cuts == ["layer1", "layer2", "layer3"] and net.cfg.cuts == ("layer1", "layer2", "layer3")
    assert net.shapes == [(3, 32, 32), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    assert "fc" in net.module_labels[-1]                                 # the last module ends in the model's fc
    vit = contsup.wrap(models["vit"], cuts=["encoder.layers.encoder_layer_1"], image_size=32)
    assert vit.shapes[1] == (17, 32)
    seq = contsup.wrap(models["sequential"], cuts=["5", "8"], image_size=32)  # after the 2nd and 3rd ReLU
    assert seq.shapes[1:] == [(16, 16, 16), (16, 16, 16)]


@pytest.mark.parametrize("cuts,message", [
    (["layer1.0.conv1"], "cannot cut after 'layer1.0.conv1': 2 values cross there"),
    (["layer9"], "no module 'layer9' runs in ResNet's forward"),
    (["layer2", "layer1"], "give the cuts in forward order"),
    (99, "places where one tensor crosses: at most K="),
])
def test_bad_cuts_are_refused_in_one_line(models, cuts, message):
    with pytest.raises(UsageError, match=message) as e:
        contsup.wrap(models["resnet18"], cuts=cuts, image_size=32)
    assert "\n" not in str(e.value)
    if cuts == ["layer1.0.conv1"]:
        assert "nearest places: 'maxpool' or 'layer1.0'" in str(e.value)


def test_shapes_without_a_rule_and_untraceable_models_are_refused():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.raises(UsageError, match="has 0 places where one tensor crosses: at most K=1"):
        contsup.wrap(mlp, cuts=2, image_size=32)
    with pytest.raises(UsageError, match=r"cannot cut after '1': the tensor there, \[B, 64\], has no head or "
                                         "encoder rule"):
        contsup.wrap(mlp, cuts=["1"], image_size=32)

    class Branchy(nn.Module):
        def forward(self, x):
            return x.mean() if x.sum() > 0 else x   # data-dependent control flow: fx cannot trace it
    with pytest.raises(UsageError, match="torch.fx cannot trace Branchy"):
        contsup.wrap(Branchy(), cuts=2, image_size=32)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    tied = nn.Sequential(conv, nn.ReLU(), conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    with pytest.raises(UsageError, match="parameter '0.weight' is used by modules 0 and 1"):
        contsup.wrap(tied, cuts=["1"], image_size=32)
    with pytest.raises(UsageError, match="returns 10 logits, not num_classes=100"):
        contsup.wrap(small_sequential(), cuts=2, image_size=32, num_classes=100)


@pytest.mark.parametrize("family", ["resnet18", "vit", "sequential"])
def test_module_k_loss_reaches_module_k_and_its_encoders_only(models, family):
    torch.manual_seed(0)
    net = contsup.wrap(models[family], cuts=3, mode="R1E", image_size=32).train()
    x, y = batch()
    for target in (1, 2):
        net.zero_grad(set_to_none=True)

        def run(k, h_in):
            return module_step(net, k, h_in, x, y)[0] if k == target else net.module_forward(k, h_in)
        net.run_modules(x, run)
        grads = lambda m: [p.grad for p in m.parameters()]  # noqa: E731
        assert all(g is None for k in range(target) for g in grads(net.blocks[k]))   # nothing earlier
        assert all(g is None for k in range(target) for g in grads(net.heads[k]))
        assert any(g is not None and g.abs().sum() > 0 for g in grads(net.blocks[target]))
        feeding = net.context[target - 1]
        assert feeding.image is not None and (len(feeding.residual) == 1 or target == 1)  # R1E: image (+ residual)
        assert all(g is not None and g.abs().sum() > 0 for g in grads(feeding))        # the encoders feeding k
        assert all(g is None for c in list(net.context)[target:] for g in grads(c))


@pytest.mark.parametrize("family", ["resnet18", "vit"])
def test_a_wrapped_net_trains_through_the_local_learning_step(models, family):
    torch.manual_seed(0)
    net = contsup.wrap(models[family], cuts=4, image_size=32, reconstruct=True, loss_scales=(1, 1, 1, 1)).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = batch(16)
    image = torch.rand(16, 3, 32, 32)
    first = None
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        logits, losses = local_learning_step(net, x, y, image)
        assert logits.shape == (16, 10) and losses.shape == (4,) and torch.isfinite(losses).all()
        opt.step()
        first = losses if first is None else first
    assert (losses < first).any()


def test_token_rules():
    layout = TokenLayout.of((17, 32))
    assert (layout.grid, layout.class_token) == (4, True)
    enc = PatchEncoder(3, 32, layout)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 17, 32) and torch.equal(out[:, 0], torch.zeros(2, 32))   # class token: no context
    with pytest.raises(UsageError, match="neither a square grid"):
        TokenLayout.of((15, 32))


def test_config_rules_for_other_archs():
    assert ModelConfig(arch="torchvision:resnet18", cuts="layer1,layer2").k == 3
    assert ModelConfig(arch="torchvision:resnet18", cuts="layer1,layer2", k=3).k == 3
    assert ModelConfig(arch="torchvision:resnet18").k == ModelConfig().k == 4      # neither -k nor --cuts
    for kwargs, message in [
        ({"arch": "torchvision:resnet18", "balanced": True}, "drop --balanced"),
        ({"arch": "torchvision:resnet18", "reconstruct": True}, "needs --loss-scales"),
        ({"arch": "resnet32", "cuts": "a,b"}, "drop --cuts"),
        ({"arch": "torchvision:resnet18", "cuts": "a,b", "k": 5}, "so K=3: drop -k 5"),
        ({"arch": "torchvision:resnet18", "cuts": "a,b", "k": 4}, "so K=3: drop -k 4"),   # -k 4 given, not defaulted
        ({"arch": "torchvision:resnet18", "k": "4"}, "-k must be a positive integer"),
        ({"arch": "resnet-18"}, "unknown arch 'resnet-18'"),
    ]:
        with pytest.raises(UsageError, match=message):
            ModelConfig(**kwargs)
    with pytest.raises(UsageError, match="torchvision has no classification model 'resnet7'"):
        build_net(ModelConfig(arch="torchvision:resnet7", dataset="digits"))
    with pytest.raises(UsageError, match="cannot import"):
        build_net(ModelConfig(arch="no_such_package.models:make", dataset="digits"))
    net = build_net(ModelConfig(arch="tests.test_wrap:factory", k=2, dataset="digits", mode="E"))
    assert net.k == 2 and net.num_classes == 10


def factory(num_classes):
    """An importable model factory, as --arch package.module:factory calls it."""
    model = small_sequential()
    model[-1] = nn.Linear(32, num_classes)
    return model


def test_train_and_describe_a_torchvision_model_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--arch", "torchvision:resnet18", "-k", "4", "--dataset", "digits", "--epochs", "1",
            "--train-subset", "64", "--batch-size", "32", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert 0 <= result["final_error"] <= 100 and result["peak_activation_bytes"] > 0
    assert json.loads((out / "config.json").read_text())["arch"] == "torchvision:resnet18"
    capsys.readouterr()
    assert main(["describe", "--arch", "torchvision:resnet18", "--cuts", "layer1,layer2,layer3", "--batch-size",
                 "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cut_points"] == ["layer1", "layer2", "layer3"] and report["modules"] == 4
    assert report["peak_activation_MiB"] > 0
    assert main(["train", "--arch", "torchvision:resnet18", "--balanced"]) == 2


@pytest.mark.parametrize("family", ["resnet18", "vit"])
def test_compiled_wrapped_net_steps_without_a_recompile_and_matches_eager(models, family):
    """--compile on a wrapped net: each piece (an fx GraphModule), head and encoder compiles
    on its own code object (train.compile_model); the second step recompiles nothing."""
    torch.manual_seed(0)
    net = contsup.wrap(models[family], cuts=4, mode="R1E", image_size=32).train()
    ref = set_context_impl(copy.deepcopy(net), "plain")
    x, y = batch(8)
    torch._dynamo.reset()
    counters.clear()
    compile_model(net, backend="eager")
    _, losses = local_learning_step(net, x, y)
    assert not any("recompile" in r.lower() or "cache_size" in r for r in counters["unimplemented"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        net.zero_grad(set_to_none=True)
        local_learning_step(net, x, y)
    _, losses_ref = local_learning_step(ref, x, y)
    torch.testing.assert_close(losses, losses_ref)


def test_bf16_step_and_encoder_impls_of_a_wrapped_vit(models):
    torch.manual_seed(0)
    net = set_context_impl(contsup.wrap(models["vit"], cuts=3, mode="R1E", image_size=32), "lean").train()
    assert encoder_impls(net) == {"plain": 3}        # token encoders have no lean form: they run plain
    cnn = set_context_impl(contsup.wrap(models["resnet18"], cuts=3, mode="R1E", image_size=32), "lean")
    assert encoder_impls(cnn) == {"lean": 3}
    x, y = batch(8)
    logits, losses = local_learning_step(net, x, y, bf16=True)
    assert torch.isfinite(losses).all() and logits.dtype == torch.bfloat16


def _wrapped_cfg(out, **changes):
    from contsup.train import TrainConfig
    return TrainConfig(**{"dataset": "digits8", "arch": "tests.test_wrap:factory", "k": 3, "mode": "R1E", "epochs": 3,
                          "warmup_epochs": 1, "batch_size": 64, "lr": 0.05, "train_subset": 256, "out_dir": str(out),
                          "device": "cpu", "seed": 3} | changes)


def test_a_wrapped_run_interrupted_and_resumed_equals_the_uninterrupted_one(tmp_path, interrupt_in_second_evaluation):
    from contsup.train import train
    straight = train(_wrapped_cfg(tmp_path / "straight"), progress=False)
    restore = interrupt_in_second_evaluation()
    with pytest.raises(KeyboardInterrupt):
        train(_wrapped_cfg(tmp_path / "resumed"), progress=False)
    restore()
    resumed = train(_wrapped_cfg(tmp_path / "resumed"), resume=True, progress=False)
    assert resumed["final_error"] == straight["final_error"] and resumed["cuts"] == straight["cuts"]
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_wrapped_run_stops_with_the_module_named(tmp_path):
    from contsup.errors import DivergedError
    from contsup.train import train
    with pytest.raises(DivergedError) as e:
        train(_wrapped_cfg(tmp_path / "run", lr=1e12, warmup_epochs=0, check_every=1), progress=False)
    assert 1 <= e.value.module <= 3 and "--lr" in str(e.value)


def test_cuts_flag_takes_names_that_look_like_numbers():
    from contsup import cli
    from contsup.train import TrainConfig
    train = cli.build_parser().subcommands["train"]
    args = train.parse_args(["--arch", "tests.test_wrap:factory", "--cuts", "2,5"])
    cfg = TrainConfig(**cli.given(args, TrainConfig))
    assert cfg.cuts == ("2", "5") and cfg.k == 3
    assert build_net(cfg.model_config()).cuts == ["2", "5"]


def test_image_encoders_pool_the_image_only_beyond_the_papers_ratio(models):
    from contsup.model import ContSupNet, ImageEncoder
    for cfg in (ModelConfig(arch="resnet32", k=16, mode="R1E"), ModelConfig(arch="resnet110", k=4, mode="E",
                                                                              dataset="stl10")):
        encoders = [m for m in ContSupNet(cfg).modules() if isinstance(m, ImageEncoder)]
        assert encoders and all(isinstance(e.pre, nn.Identity) for e in encoders)   # the paper's, unchanged
    net = contsup.wrap(models["resnet18"], cuts=["layer1", "layer2", "layer3"], mode="E", image_size=32)
    sides = [(e.pre.output_size if isinstance(e.pre, nn.AdaptiveAvgPool2d) else None) for e in
             (c.image for c in net.context)]
    assert sides == [None, 16, 8]                                     # feature sides 8, 4, 2: at most 4x
    assert net.context[2].image(torch.randn(2, 3, 32, 32)).shape == (2, 256, 2, 2)



def test_heads_stride_on_every_stage_but_the_last_as_the_papers(models):
    """The paper's head: C->2C stride 2 on its 16- and 32-wide stages, 64->64 stride 1 on the
    last; a wrapped model's stages are told by width against its widest map (ResNet-18: 512)."""
    from contsup.model import ContSupNet

    def convs(net):
        return [(c.in_channels, c.out_channels, c.stride[0]) for c in (h.net[0][0] for h in net.heads)]
    paper = ContSupNet(ModelConfig(arch="resnet32", k=4, mode="R0", balanced=False))
    assert convs(paper) == [(16, 32, 2), (32, 64, 2), (64, 64, 1)]
    net = contsup.wrap(models["resnet18"], cuts=["layer1", "layer3", "layer4"], mode="R0", image_size=32)
    assert convs(net)[:2] == [(64, 128, 2), (256, 512, 2)]
    assert convs(net)[2] == (512, 512, 1)                           # the last stage, the widest map
    vgg = contsup.wrap(models["vgg11"], cuts=2, mode="R0", image_size=32)
    assert all(s == (1 if c_in == 512 else 2) for c_in, _, s in convs(vgg))


def test_a_model_in_training_mode_is_traced_in_eval_mode():
    """fx bakes `self.training` read in forward code into the graph: traced in training mode,
    efficientnet's stochastic depth would drop paths at test time too."""
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=10)           # training mode, as built
    net = contsup.wrap(model, cuts=3, mode="R0", image_size=32)
    assert net.training and all(m.training for m in net.modules())      # back in the model's mode
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(net.eval()(x), model.eval()(x))
