"""One run, module-parallel: the K local modules split into G stages, one per rank.

    rank 0 (reads data)            rank 1                         rank G-1
    [modules 0..a) ──message──> [cut a-1 encoders, modules a..b) ──> ... ──> [.., module K-1] -> logits

Local learning needs no gradient across a cut, so only activations flow: rank r owns its
modules, their heads and decoders, and the context encoders of the cuts that feed its
modules (`module_of`), runs forward + local loss + backward for them (step.module_step) and
steps its own optimizer. Processing the batches in order (a FIFO pipeline) gives exactly
the single-process result of train.train, bit for bit at the same thread count per process
(on CUDA only under --deterministic); world size 1 runs the same code.

Reading order, one concern per file: `split` (the stage split, by measured per-module
step time; `describe --stages` by counted FLOPs), `messages` (what a rank owns, what each
link carries, the message format, the links: a ring of D in-flight flat buffers), `stages`
(one batch through a rank's modules, and a rank's epoch: receive, step, send, its books
kept by epoch.EpochSteps as the trainer keeps them), `watch` (our watchdog, the one-line
blame), `run` (`train_pipelined`: setup, the epochs, metrics and checkpoint assembly on
rank 0) and `faults` (the tests' fault injection, the one seam). Ctrl-C or SIGTERM
(torchrun's stop) on any rank stops every rank, each with at most one line; the last
checkpoint stays.

Devices: gloo on CPU; NCCL on CUDA, rank r on cuda:LOCAL_RANK (`rank_device`).

    torchrun --nproc-per-node 2 -m contsup train --dataset digits8 -k 4 ...   # G = 2
    torchrun --nproc-per-node 2 -m contsup train --arch torchvision:resnet18 --dataset digits -k 4 ...   # wrapped
    python -m contsup train --pipeline ...                                     # G = 1, same path
"""
from .run import DEPTH, rank_device, train_pipelined
from .split import balanced_split, count_module_flops, predicted_speedup
from .watch import TIMEOUT_S, RankFailure

__all__ = ["DEPTH", "TIMEOUT_S", "RankFailure", "balanced_split", "count_module_flops", "predicted_speedup",
           "rank_device", "train_pipelined"]
