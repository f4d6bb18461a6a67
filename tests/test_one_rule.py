"""One rule, one place: a new context mode or a new config field is written once.

A new mode in a paper table needs the method (model.py: `parse_mode`, `ContextMode`) and
the table's mode list (tables.py), nothing else: the registry expands its runs, the model
builds it, the run cost counts its encoders, the report gives it a row. A new config field
needs its dataclass line (with `errors.option`) and its check in __post_init__, nothing
else: the command line gets the flag with its help and default, and a bad value is refused
by the check, in one line naming the flag.
"""
import argparse
from dataclasses import dataclass, fields

import pytest
import torch
import torch.nn as nn

import contsup.train as train_module
from contsup import cli, errors, tables
from contsup.cli import main
from contsup.errors import check_int, command_line, option
from contsup.model import BasicBlock, ContSupNet, ModelConfig, parse_mode
from contsup.speed.encoders import set_context_impl
from contsup.step import local_learning_step
from contsup.study import experiments, grid, report, reproduce, runs
from contsup.train import TrainConfig
from test_report import write_run


# --------------------------------------------------------------------------------------
# A new context mode: R2E (the inputs of the last two modules and the image) in Table 4
@pytest.fixture
def r2e_in_table4(monkeypatch):
    """The one edit a new Table 4 mode takes: the paper's mode list in tables.py."""
    monkeypatch.setattr(tables, "RESIDUAL_MODES", (*tables.RESIDUAL_MODES, "R2E"))


def conv_and_linear_layers(net: ContSupNet) -> int:
    """The conv/linear layers one training step runs, counted on the built network (the
    1x1 shortcut convs aside, which proxy_cost leaves out)."""
    shortcuts = sum(isinstance(m, BasicBlock) and not isinstance(m.shortcut, nn.Identity) for m in net.modules())
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules()) - shortcuts


def test_the_mode_is_parsed_in_one_place():
    r2e = parse_mode("R2E", None)
    assert (r2e.n, r2e.image, r2e.name) == (2, True, "R2E")
    assert r2e.fits(2) and r2e.fits(16) and not r2e.fits(1)
    assert [r2e.residual_sources(cut) for cut in range(4)] == [[], [1], [2, 1], [3, 2]]  # module 0's input = image
    assert parse_mode("R2", None).residual_sources(1) == [1, 0]                          # without E, the image too
    assert parse_mode("E", None).residual_sources(3) == [] and parse_mode("R0", None).residual_sources(3) == []


def test_a_new_mode_in_table4_needs_only_the_method_and_its_table(r2e_in_table4, tmp_path):
    # the registry expands it, at both K of Table 4
    new = [r for r in experiments.expand("table4", "smoke", tmp_path / "results") if r.config.mode == "R2E"]
    assert sorted(r.config.k for r in new) == [8, 16]

    # the model builds it: an image encoder at every cut, residual encoders on the inputs of
    # the last two modules but module 0's (the image), and it trains a step
    cfg = TrainConfig(dataset="digits8", k=8, mode="R2E", epochs=2, train_subset=64)
    net = ContSupNet(cfg.model_config())
    assert all(ctx.image is not None for ctx in net.context)
    assert [ctx.sources for ctx in net.context] == [[], [1], [2, 1], [3, 2], [4, 3], [5, 4], [6, 5]]
    assert net.keep_inputs == 1
    x = torch.randn(4, 3, 8, 8)
    _, losses = local_learning_step(set_context_impl(net, "lean"), x, torch.arange(4))
    assert losses.shape == (8,) and torch.isfinite(losses).all()
    assert net.eval()(x).shape == (4, 10)

    # the run cost counts the layers the network has, as for a mode the code knew before
    r0 = TrainConfig(dataset="digits8", k=8, mode="R0", epochs=2, train_subset=64)
    layers = conv_and_linear_layers(net), conv_and_linear_layers(ContSupNet(r0.model_config()))
    assert grid.proxy_cost(cfg) * layers[1] == grid.proxy_cost(r0) * layers[0]
    assert layers[0] > layers[1]

    # the report gives it a row of Table 4 (R2E needs K >= 2: both K=8 and K=16 are filled)
    results = tmp_path / "fake"
    write_run(results, k=1, mode="R0", final_error=10.0, peak_mb=150.0)
    write_run(results, k=8, mode="R2E", final_error=21.0, peak_mb=30.0)
    write_run(results, k=16, mode="R2E", final_error=23.0, peak_mb=25.0)
    write_run(results, k=16, mode="R16", final_error=26.0, peak_mb=28.0)
    t = report.table4(runs.collect(results))
    assert list(t.index) == ["E2E", "R0", "E", "R1", "R2", "R4", "R8", "R16", "R2E"]
    ours = t["ours (digits)"]
    assert (ours.loc["R2E", "K=8 error (%)"], ours.loc["R2E", "K=16 error (%)"]) == (21.0, 23.0)
    assert ours.loc["R16", "K=16 error (%)"] == 26.0 and ours["K=8 error (%)"].isna()["R16"]  # R16 needs K=16
    assert report.format_table(t).loc["R2E", ("ours (digits)", "K=16 error (%)")] == "23.00"


# --------------------------------------------------------------------------------------
# A new config field: written once, on its dataclass
@pytest.fixture
def config_with_patience(monkeypatch):
    """A TrainConfig with one more field, as a contributor would add it: the field with its
    help and flag (errors.option), and its check in __post_init__. The trainer's config is
    replaced by it; nothing else changes."""
    monkeypatch.setattr(errors, "FLAGS", dict(errors.FLAGS))  # the class below registers its flag there

    @command_line
    @dataclass
    class WithPatience(TrainConfig):
        patience: int = option(3, "stop after N epochs without a better test error", flag="--patience-epochs")

        def __post_init__(self):
            super().__post_init__()
            self.patience = check_int("patience", self.patience, 1)

    monkeypatch.setattr(train_module, "TrainConfig", WithPatience)
    return WithPatience


def flag_actions(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a for a in parser._actions if a.option_strings}


def test_a_new_config_field_is_written_once(config_with_patience, tmp_path, capsys):
    train = cli.build_parser().subcommands["train"]
    patience = flag_actions(train)["patience"]
    assert patience.option_strings == ["--patience-epochs"] and patience.type is int
    assert patience.help == "stop after N epochs without a better test error (default: 3)"
    assert "--patience-epochs PATIENCE_EPOCHS" in train.format_help()
    # not given: the dataclass's default; given: the value, through the dataclass's check
    build = lambda *argv: config_with_patience(**cli.given(train.parse_args(list(argv)), config_with_patience))  # noqa: E731
    assert build().patience == 3
    assert build("--patience-epochs", "5", "-k", "2").patience == 5
    # a bad value: refused by the field's own check, one line naming the flag, exit 2, nothing written
    assert main(["train", "--patience-epochs", "0", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "contsup: error: --patience-epochs must be a positive integer, got 0\n"
    assert not (tmp_path / "run").exists()
    assert main(["train", "--patience-epochs", "soon"]) == 2
    assert "invalid int value: 'soon'" in capsys.readouterr().err


# The flags as they were written by hand before they came from the dataclasses: the contract.
TRAIN_FLAGS = {
    "arch": ["--arch"], "k": ["-k", "--k"], "cuts": ["--cuts"], "mode": ["--mode"], "loss": ["--loss"], "head": ["--head"],
    "reconstruct": ["--reconstruct"], "loss_scales": ["--loss-scales"], "balanced": ["--balanced"],
    "dataset": ["--dataset"], "widen": ["--widen"], "context_impl": ["--context-impl"],
    "channels_last": ["--no-channels-last"], "bf16": ["--bf16"], "cudnn_benchmark": ["--no-cudnn-benchmark"],
    "deterministic": ["--deterministic"], "torch_compile": ["--compile"], "reuse_cpu_memory": ["--no-reuse-cpu-memory"],
    "epochs": ["--epochs"], "batch_size": ["--batch-size"], "lr": ["--lr"], "warmup_epochs": ["--warmup-epochs"],
    "data_root": ["--data-root"], "download": ["--download"], "train_subset": ["--train-subset"],
    "out_dir": ["--out"], "device": ["--device"], "seed": ["--seed"], "check_every": ["--check-every"],
}


def test_every_field_has_its_flag_with_the_spelling_it_always_had():
    parser = cli.build_parser()
    train, describe = (flag_actions(parser.subcommands[c]) for c in ("train", "describe"))
    assert {f.name for f in fields(TrainConfig)} == set(TRAIN_FLAGS)
    for name, spelling in TRAIN_FLAGS.items():
        assert train[name].option_strings == spelling and train[name].help, name
    for f in fields(ModelConfig):
        assert describe[f.name].option_strings == TRAIN_FLAGS[f.name]
    assert "epochs" not in describe and describe["batch_size"].default == 256  # describe's own --batch-size
    # the spellings the checks' messages use come from the same field metadata
    assert errors.flag("out_dir") == "--out" and errors.flag("k") == "-k" and errors.flag("batch_size") == "--batch-size"


def test_flags_not_given_leave_the_dataclass_defaults():
    train = cli.build_parser().subcommands["train"]
    args = train.parse_args(["--no-channels-last", "--compile", "--loss-scales", "5,1,0,0", "--reconstruct"])
    assert cli.given(args, TrainConfig) == {"channels_last": False, "torch_compile": True,
                                            "loss_scales": (5.0, 1.0, 0.0, 0.0), "reconstruct": True}
    cfg = TrainConfig(**cli.given(train.parse_args([]), TrainConfig))
    assert cfg == TrainConfig()
