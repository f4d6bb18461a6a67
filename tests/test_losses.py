"""Local losses and the learning-rate schedule against direct computations and SPEC values."""
import math

import pytest
import torch

from contsup.losses import reconstruction_loss, supcon_loss
from contsup.train import learning_rate


def supcon_by_loops(z, labels, t=0.07):
    """Khosla et al. (2020) eq. 2, one view, written as plainly as possible."""
    z = torch.nn.functional.normalize(z, dim=1)
    per_anchor = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(len(z)) if a != i)
        per_anchor.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denom) for p in positives)
                          / len(positives))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supcon_equals_loop_computation(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # class 3 has no positive: left out
    got = supcon_loss(z, labels).item()
    assert got == pytest.approx(supcon_by_loops(z, labels), rel=1e-5)


def test_supcon_prefers_clustered_embeddings():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0], [1, 0.01], [0, 1], [0.01, 1]])
    mixed = torch.tensor([[1.0, 0], [0, 1], [1, 0.01], [0.01, 1]])
    assert supcon_loss(clustered, labels) < supcon_loss(mixed, labels)


def test_reconstruction_loss_is_bce_of_the_sigmoid():
    logits, image = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    p = torch.sigmoid(logits)
    direct = -(image * p.log() + (1 - image) * (1 - p).log()).mean()
    assert reconstruction_loss(logits, image).item() == pytest.approx(direct.item(), rel=1e-5)


def test_learning_rate_schedule_at_spec_points():
    lr = lambda e: learning_rate(e, 0.8, 160, 10)  # noqa: E731  CIFAR-10 recipe
    assert lr(0) == pytest.approx(0.01)                                  # warm-up starts at 0.01
    assert lr(10) == pytest.approx(0.8 * (1 + math.cos(math.pi * 10 / 160)) / 2)
    assert lr(5) == pytest.approx((0.01 + lr(10)) / 2)                   # linear in between
    assert lr(80) == pytest.approx(0.4)                                  # cosine midpoint
    assert lr(159) == pytest.approx(0.8 * (1 + math.cos(math.pi * 159 / 160)) / 2)
    assert lr(159) < 1e-3
    assert all(lr(e) > lr(e + 1) for e in range(10, 159))                # monotone after warm-up
    assert learning_rate(0, 0.1, 160, 0) == pytest.approx(0.1)           # no warm-up: cosine from the top
