"""Local losses against direct computations (the authors' formulas written as loops)."""
import math

import pytest
import torch

from contsup.losses import reconstruction_loss, supcon_loss


def supcon_per_anchor_by_loops(z, labels, t=0.07, base_t=0.07):
    """The authors' SupConLoss (one view, contrast_mode 'all'), written as plainly as
    possible: every anchor's loss is -(t/base_t) * the mean log-probability of its
    positives, 0 for an anchor without one; the mean is over all anchors. Logits are
    shifted by the row maximum (self-similarity included) before exp, as theirs are."""
    z = torch.nn.functional.normalize(z, dim=1)
    n = len(z)
    per_anchor = []
    for i in range(n):
        row = [float(z[i] @ z[a]) / t for a in range(n)]
        row = [v - max(row) for v in row]
        log_denom = math.log(sum(math.exp(row[a]) for a in range(n) if a != i))
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        mean_log_prob = sum(row[p] - log_denom for p in positives) / max(len(positives), 1)
        per_anchor.append(-(t / base_t) * mean_log_prob)
    return per_anchor


def supcon_by_loops(z, labels, t=0.07, base_t=0.07):
    per_anchor = supcon_per_anchor_by_loops(z, labels, t, base_t)
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supcon_equals_loop_computation(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # classes 2 and 3 appear once: they score 0
    got = supcon_loss(z, labels).item()
    assert got == pytest.approx(supcon_by_loops(z, labels), rel=1e-5)


def test_supcon_singletons_count_in_the_mean_over_the_whole_batch():
    """A batch of 8 with 5 singletons (like STL-10's last batch): the loss and its gradient
    are 3/8 of what a mean over the anchors with a positive would give."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5])
    loss = supcon_loss(z, labels)
    assert loss.item() == pytest.approx(supcon_by_loops(z.detach(), labels), rel=1e-6)
    per_anchor = supcon_per_anchor_by_loops(z.detach(), labels)
    assert per_anchor[3:] == [0.0] * 5
    mean_over_anchors_with_positive = sum(per_anchor[:3]) / 3  # what this code computed before
    assert loss.item() == pytest.approx(3 / 8 * mean_over_anchors_with_positive, rel=1e-6)
    only_singletons = torch.arange(8)
    assert supcon_loss(z, only_singletons).item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    one = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)  # a last batch of one image
    supcon_loss(one, labels[:1]).backward()
    assert torch.equal(one.grad, torch.zeros_like(one))  # 0, not NaN (theirs: 0 * log 0)


def test_supcon_temperature_factor():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    got = supcon_loss(z, labels, temperature=0.1, base_temperature=0.07).item()
    assert got == pytest.approx(supcon_by_loops(z, labels, t=0.1, base_t=0.07), rel=1e-6)


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
