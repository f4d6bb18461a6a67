"""One test per paper table (METHOD §3-§5, §8): the data in tables.py means what METHOD.md says."""
import math

import pytest

from contsup import tables
from contsup.errors import UsageError
from contsup.model import ContSupNet, ModelConfig, backbone_layers


def all_cut_tables():
    for arch, by_k in tables.EQUAL_CUTS.items():
        for k in by_k:
            yield arch, k, False, "cifar10"
    for (arch, data), by_k in tables.BALANCED_CUTS.items():
        for k in by_k:
            yield arch, k, True, data


@pytest.mark.parametrize("arch,k,balanced,dataset", list(all_cut_tables()))
def test_cut_points_give_k_modules_ending_at_the_cuts(arch, k, balanced, dataset):
    net = ContSupNet(ModelConfig(arch=arch, k=k, mode="R0", balanced=balanced, dataset=dataset))
    cuts = tables.cut_points(arch, k, balanced, dataset)
    assert len(cuts) == k - 1 and len(net.blocks) == k
    # module i ends exactly at cut i, the last module ends at the last block of stage 3
    assert [labels[-1] for labels in net.module_labels[:-1]] == cuts
    assert net.module_labels[-1][-1] == (3, tables.BLOCKS_PER_STAGE[arch] - 1)
    # modules partition the network in order, none empty
    flat = [label for labels in net.module_labels for label in labels]
    assert flat == [label for label, _ in backbone_layers(arch)]
    assert all(net.module_labels)


def test_equal_cut_tables_spot_values_from_spec():
    assert tables.cut_points("resnet32", 4) == [(1, 2), (2, 1), (3, 0)]
    assert tables.cut_points("resnet110", 8)[2] == (2, 0)
    assert tables.cut_points("resnet110", 16)[-1] == (3, 13)
    assert len(tables.cut_points("resnet32", 16)) == 15
    assert tables.cut_points("resnet32", 1) == []
    # balanced tables keyed by resolution: STL-10 (96 px) differs from CIFAR-10 at K=3
    assert tables.cut_points("resnet110", 3, True, "stl10") == [(1, 8), (2, 1)]
    assert tables.cut_points("resnet110", 3, True, "cifar10") == [(1, 9), (2, 2)]
    assert tables.cut_points("resnet32", 2, True, "digits") == [(1, 3)]


@pytest.mark.parametrize("call", [
    lambda: tables.cut_points("resnet50", 4),
    lambda: tables.cut_points("resnet32", 5),
    lambda: tables.cut_points("resnet110", 8, balanced=True),
    lambda: tables.loss_scales("resnet32", "stl10", 4),
    lambda: tables.check_dataset("mnist"),
])
def test_table_lookups_fail_with_the_choices(call):
    with pytest.raises(UsageError) as e:
        call()
    assert "\n" not in str(e.value) and ("choose" in str(e.value) or "paper gives" in str(e.value)
                                         or "with a table" in str(e.value))


def test_loss_scale_table_and_interpolation():
    assert tables.loss_scales("resnet110", "stl10", 4) == (20, 0.2, 5, 2)
    assert tables.loss_scales("resnet32", "digits", 16) == (5, 0.05, 0.2, 0.5)  # digits borrows CIFAR-10's
    assert tables.loss_scales("resnet32", "cifar10", 8, balanced=True) == (5, 0, 0, 2)
    s = tables.loss_scales("resnet32", "cifar10", 16)
    # first cut: (ixx_1, ixy_1); cut K-2: (ixx_2, ixy_2); halfway: the mean
    assert tables.interpolate_scales(s, 0, 16) == pytest.approx((5, 0.05))
    assert tables.interpolate_scales(s, 14, 16) == pytest.approx((0.2, 0.5))
    assert tables.interpolate_scales(s, 7, 16) == pytest.approx((2.6, 0.275))
    assert tables.interpolate_scales((5, 1, 0, 0), 0, 2) == (5, 1)  # K=2: the single cut
    net = ContSupNet(ModelConfig(arch="resnet32", k=4, mode="R0", reconstruct=True))
    assert [w for pair in net.loss_weights for w in pair] == pytest.approx([6, 0, 3.5, 1, 1, 2])


def test_data_recipes_follow_spec_section_5():
    c, s, l = (tables.DATA_RECIPES[d] for d in ("cifar10", "svhn", "stl10"))
    assert (c.batch_size, c.lr, c.pad, c.pad_mode, c.flip) == (1024, 0.8, 4, "reflect", True)
    assert c.mean[0] == pytest.approx(125.3 / 255) and c.std[2] == pytest.approx(66.7 / 255)
    assert (s.pad, s.flip, s.mean, s.std) == (2, False, (0.5,) * 3, (0.5,) * 3)
    assert (l.batch_size, l.lr, l.image_size, l.num_classes) == (128, 0.1, 96, 10)  # not 100
    assert tables.PAPER_SCHEDULE.epochs == 160 and tables.PAPER_SCHEDULE.warmup_epochs == 10


def test_reference_numbers_are_well_formed():
    for (data, arch, method), by_k in tables.INFOPRO_REFERENCE.items():
        assert (data, arch) in tables.E2E_REFERENCE
        assert set(by_k) == {2, 4, 8, 16} and all(0 < v < 100 for v in by_k.values())
        if "Greedy" in method:  # greedy SL degrades with K, the paper's premise
            assert list(by_k.values()) == sorted(by_k.values())
    assert not math.isnan(tables.INFOPRO_MEMORY_GB["E2E"])


@pytest.mark.parametrize("arch", ["resnet32", "resnet110"])
def test_backbone_parameter_counts(arch):
    net = ContSupNet(ModelConfig(arch=arch, k=1, mode="R0"))
    assert net.parts()["backbone"] == tables.BACKBONE_PARAMS[arch]
    assert net.parts()["local_heads"] == net.parts()["context_encoders"] == 0


def test_mode_lists_are_the_papers():
    """Table 1 / Figure 5 compare no context, the image, the last module's input and both;
    Table 4 lengthens the residual context R1..R16 (METHOD §6). Every entry is a valid mode at
    K=16, and Table 4's residual lengths double."""
    from contsup.model import parse_mode
    assert tables.ABLATION_MODES == ("R0", "E", "R1", "R1E")
    assert [parse_mode(m, 16).n for m in tables.RESIDUAL_MODES] == [0, 0, 1, 2, 4, 8, 16]
    assert [parse_mode(m, 16).image for m in tables.RESIDUAL_MODES] == [False, True] + [False] * 5
    assert tables.KS == (2, 4, 8, 16)
