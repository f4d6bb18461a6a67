"""Local losses (SPEC §4): softmax, supervised contrastive, reconstruction."""
from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.07


def supcon_loss(embedding, labels, temperature: float = TEMPERATURE):
    """Supervised contrastive loss (Khosla et al. 2020) with one view per sample.

    embedding: [B, D] (L2-normalised here); labels: [B]. For each anchor i with at least one
    positive, -mean_{p: y_p = y_i, p != i} log( exp(z_i.z_p/T) / Σ_{a != i} exp(z_i.z_a/T) ).
    Anchors without a positive in the batch are left out of the mean.
    """
    z = F.normalize(embedding.float(), dim=1)
    logits = z @ z.T / temperature                                      # [B, B]
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))               # a != i
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0.0).sum(1) / n_pos.clamp(min=1)
    has_pos = n_pos > 0
    return -(mean_log_prob_pos[has_pos]).sum() / has_pos.sum().clamp(min=1)


def head_loss(output, labels, loss: str):
    """Loss of an auxiliary head: cross-entropy on logits, or SupCon on an embedding."""
    if loss == "softmax":
        return F.cross_entropy(output, labels)
    return supcon_loss(output, labels)


def reconstruction_loss(decoder_logits, image):
    """Binary cross-entropy between sigmoid(decoder output) and the image in [0, 1]."""
    return F.binary_cross_entropy_with_logits(decoder_logits.float(), image.float())
