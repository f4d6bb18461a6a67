"""The local-learning step (METHOD §1-§2): the whole method in one loop.

    for each module k:   h = module_k(h_in)                 forward
                         loss_k = local loss of h          head (+ decoder); the last module: the classifier
                         loss_k.backward()                 reaches module k and the encoders that built h_in
                         h_in = h.detach() + context_k     the next module's input: no gradient crosses the cut

The loop itself (which module, its input: the image or supply(k-1)) is `ContSupNet.run_modules`,
shared with inference and the pipeline's stages; this file is what a module does in training.
The caller zeroes the gradients before and steps the optimizer after (train.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import head_loss, reconstruction_loss
from .model import ContSupNet


def autocast(x, bf16: bool):
    """bfloat16 autocast on x's device when `bf16`, else a no-op context."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16)


def module_step(net: ContSupNet, k: int, h_in, x, y, *, image=None, bf16: bool = False):
    """Module k alone: forward, its local loss, backward (the gradient reaches module k and
    the context encoders that made `h_in`, nothing earlier). Returns the module's output (the
    class logits for the last module) and its loss, detached (0 where the loss is empty)."""
    with autocast(x, bf16):
        h = net.module_forward(k, h_in)                               # [B, C_k, H_k, W_k]; last: [B, classes]
        if k == net.k - 1:
            loss = F.cross_entropy(h, y)
        else:
            a, b = net.loss_weights[k]                                # reconstruction, head weights
            loss = b * head_loss(net.heads[k](h), y, net.cfg.loss) if b else 0.0
            if a:
                loss = loss + a * reconstruction_loss(net.decoders[k](h), image)
    if not torch.is_tensor(loss):
        return h, torch.zeros((), device=x.device)
    loss.backward()  # frees module k's graph before module k+1 starts
    return h, loss.detach()


def local_learning_step(net: ContSupNet, x, y, image=None, bf16: bool = False):
    """Forward and backward through the K modules, one at a time (METHOD §1-§2).

    For module k: forward, its own local loss, backward (`module_step`), then the detached
    output plus context becomes the next input (the loop: `ContSupNet.run_modules`). K=1 is end-to-end. `image` ([B,3,S,S] in
    [0,1]) is the reconstruction target. Returns the final logits (detached) and the K losses.
    Gradients accumulate into .grad; the caller zeroes and steps the optimizer.
    `bf16` runs the forward passes under bfloat16 autocast.
    """
    losses = []

    def learn(k, h_in):   # module k: forward, local loss, backward
        h, loss = module_step(net, k, h_in, x, y, image=image, bf16=bf16)
        losses.append(loss)
        return h

    logits = net.run_modules(x, learn, precision=lambda: autocast(x, bf16))   # h_in: x, then supply(k-1)
    return logits.detach(), torch.stack(losses)
