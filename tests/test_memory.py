"""Device-independent peak activation memory (contsup.memory)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from contsup.speed.memory import ActivationMemoryTracker, cuda_peak_bytes, peak_activation_bytes

F32 = 4


def test_exact_bytes_of_a_linear_relu_step():
    """x [B,D] (an input: counted), W [D,D] (a parameter: excluded, and so is W.grad);
    loss = relu(x @ W).sum(); loss.backward(). With B=64, D=32 one [B,D] float is
    A = B*D*4 = 8192 bytes, a scalar 4 bytes. Live bytes after each op:

      start                    x                                         A
      mm        h1 = x @ W     x, h1                                    2A
      relu      h2             x, h1, h2                                3A   (h1 is a temporary,
                                                                             freed right after)
      sum       loss           x, h2 (saved by relu), loss              2A + 4
      ones_like dloss          + the scalar grad made by backward()    2A + 8
      expand    a view of dloss: same 4-byte storage, nothing new       2A + 8
      threshold_backward  dh1  x, h2, loss, dloss, dh1                  3A + 8   <- the peak
      -- ReluBackward is done: h2 (its saved output) and its input go --
      t(x)      a view of x                                              2A + 8
      mm        dW = x.t() @ dh1: W's gradient, excluded                 2A + 8
      -- AccumulateGrad steals dW into W.grad; dh1 is freed --           A + 8
    After backward() the scalar grad is gone: x and loss stay, A + 4.
    So peak = 3A + 8 = 24584; without the gradient exclusion the second mm would read
    2A + 8 + D*D*4 (W.grad), without counting backward the peak would be 3A.
    """
    B, D = 64, 32
    A = B * D * F32
    x = torch.randn(B, D)
    W = nn.Parameter(torch.randn(D, D))
    with ActivationMemoryTracker([W], inputs=(x,)) as t:
        loss = torch.relu(x @ W).sum()
        loss.backward()
    assert W.grad is not None and W.grad.shape == (D, D)
    assert t.peak_bytes == 3 * A + 8
    assert t.live_bytes == A + 4


def test_exact_bytes_of_views_inplace_tuples_out_and_no_grad():
    """Under no_grad, N floats = 4N bytes:
      a = empty(N)                      4N      (fresh)
      view / add_ / transpose of a      +0      (same storage, counted once)
      b = a[::2].clone()                +2N     (N/2 floats)
      values, idx = a.view(2,-1).max(0) +2N +4N (N/2 floats, N/2 int64)  tuple outputs
      c = cat([b, b], out=empty(0))     +4N     (out= resized from 0 to N floats)
    all alive at the end: peak = 16N."""
    N = 1024

    def step():
        with torch.no_grad():
            a = torch.empty(N)
            v = a.view(32, -1)
            a.add_(1.0)
            v.t_()
            b = a[::2].clone()
            values, idx = a.view(2, -1).max(0)
            c = torch.empty(0)
            torch.cat([b, b], out=c)
            assert c.numel() == N and idx.dtype == torch.int64
            return a, b, values, idx, c

    assert peak_activation_bytes(step, exclude=()) == 16 * N


def test_freed_tensors_are_not_counted():
    N = 1 << 16

    def step():
        a = torch.ones(N)
        del a
        b = torch.ones(N)
        return b

    assert peak_activation_bytes(step, exclude=()) == N * F32

    def step_both():
        a = torch.ones(N)
        b = torch.ones(N)
        return a, b

    assert peak_activation_bytes(step_both, exclude=()) == 2 * N * F32


def test_tensors_made_before_count_only_when_given_as_inputs():
    """Views of and in-place ops on a tensor made before the tracker do not start counting it;
    listing it in `inputs` does (N floats + the 4-float result)."""
    N = 1 << 14
    pre = torch.ones(N)

    def step():
        pre.view(128, -1).t().mul_(2.0)
        return pre[:4] * 1.0

    assert peak_activation_bytes(step, exclude=()) == 4 * F32
    assert peak_activation_bytes(step, exclude=(), inputs=[pre]) == (N + 4) * F32


def test_parameters_and_their_gradients_are_excluded():
    """A 4000x4000 Linear (64 MB of weight, 64 MB of gradient) on a batch of 2: the step's
    activations are a few tens of KB, and so must be the reported peak -- in a first step
    (W.grad is created: the backward's mm output becomes .grad) and in a second one
    (the incoming gradient is added into the existing .grad)."""
    torch.manual_seed(0)
    layer = nn.Linear(4000, 4000)
    x = torch.randn(2, 4000)
    weight_bytes = layer.weight.numel() * F32

    def step():
        F.relu(layer(x)).square().mean().backward()

    first = peak_activation_bytes(step, exclude=[layer], inputs=[x])
    assert layer.weight.grad is not None
    second = peak_activation_bytes(step, exclude=[layer], inputs=[x])
    for peak in (first, second):
        assert 0 < peak < 200_000 < weight_bytes
    # the tracker's gradient hooks are gone after the block
    assert not layer.weight._backward_hooks and not layer.weight._post_accumulate_grad_hooks
    # Not excluding the layer counts its weight gradient.
    layer.zero_grad(set_to_none=True)
    assert peak_activation_bytes(step, exclude=(), inputs=[x]) > weight_bytes


def conv_net(width=16, blocks=4):
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1, bias=False),
                            nn.BatchNorm2d(width), nn.ReLU()) for i in range(blocks)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    return nn.ModuleList(layers), head


def end_to_end_step(blocks, head, x, y):
    h = x
    for b in blocks:
        h = b(h)
    F.cross_entropy(head(h), y).backward()


def test_peak_scales_with_batch():
    blocks, head = conv_net()
    peaks = []
    for batch in (8, 16):
        x, y = torch.randn(batch, 3, 16, 16), torch.arange(batch) % 10
        blocks.zero_grad(set_to_none=True), head.zero_grad(set_to_none=True)
        peaks.append(peak_activation_bytes(lambda: end_to_end_step(blocks, head, x, y),
                                           exclude=[blocks, head], inputs=[x, y]))
    # one [8,16,16,16] float map is 128 KB: several of them are alive at the peak
    assert peaks[0] > 4 * 8 * 16 * 16 * 16 * F32
    assert abs(peaks[1] / peaks[0] - 2.0) < 0.02


def test_local_learning_needs_less_memory_than_end_to_end():
    """Greedy local learning: forward one block, its own loss, backward, detach, next. Only one
    block's graph is alive at a time, so the peak is well below backpropagating the whole net."""
    blocks, _ = conv_net(blocks=4)
    heads = nn.ModuleList(conv_net()[1] for _ in blocks)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 10

    def local_step():
        h_in = x
        for block, head in zip(blocks, heads):
            h = block(h_in)
            F.cross_entropy(head(h), y).backward()
            h_in = h.detach()

    whole = peak_activation_bytes(lambda: end_to_end_step(blocks, heads[-1], x, y),
                                  exclude=[blocks, heads], inputs=[x, y])
    blocks.zero_grad(set_to_none=True), heads.zero_grad(set_to_none=True)
    local = peak_activation_bytes(local_step, exclude=[blocks, heads], inputs=[x, y])
    assert whole > 1.5 * local  # measured ~1.96: 8 saved maps + grads vs 3 + grads


def test_cuda_peak_is_none_off_cuda():
    assert cuda_peak_bytes(lambda: None, "cpu") is None
    assert cuda_peak_bytes(lambda: None, torch.device("cpu")) is None
