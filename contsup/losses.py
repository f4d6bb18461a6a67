"""Local losses (METHOD §4): softmax, supervised contrastive, reconstruction."""
from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.07


def supcon_loss(embedding, labels, temperature: float = TEMPERATURE, base_temperature: float = TEMPERATURE):
    """Supervised contrastive loss (Khosla et al. 2020) with one view per sample, as the
    authors' `SupConLoss` computes it.

    embedding: [B, D] (L2-normalised here, as the authors' head does before the loss);
    labels: [B]. Anchor i's loss is
        -(T / T_base) * mean_{p: y_p = y_i, p != i} log( exp(z_i.z_p/T) / Σ_{a != i} exp(z_i.z_a/T) )
    and an anchor without a positive in the batch scores 0; the result is the mean over all
    B anchors, singletons included. So a batch with many singletons (a short last batch)
    gets a proportionally smaller contrastive loss and gradient, exactly as theirs does.
    T = T_base = 0.07 in the authors' runs, so the factor is 1. Their subtraction of the row
    maximum before exp is a numerical guard only; logsumexp does the same here.
    """
    z = F.normalize(embedding.float(), dim=1)
    logits = z @ z.T / temperature                                      # [B, B]
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))               # a != i
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0.0).sum(1) / n_pos.clamp(min=1)  # 0 without a positive
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def head_loss(output, labels, loss: str):
    """Loss of an auxiliary head: cross-entropy on logits, or SupCon on an embedding."""
    if loss == "softmax":
        return F.cross_entropy(output, labels)
    return supcon_loss(output, labels)


def reconstruction_loss(decoder_logits, image):
    """Binary cross-entropy between sigmoid(decoder output) and the image in [0, 1]."""
    return F.binary_cross_entropy_with_logits(decoder_logits.float(), image.float())
