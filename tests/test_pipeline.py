"""The pipelined trainer: bit-equal to the single-process one, interchangeable checkpoints,
a dead or hung rank named by the others, SIGTERM stopping every rank, the messages, the
device per rank, and the stage split.

Ranks run as real processes of `python -m contsup train` with the environment torchrun
gives them (gloo on CPU), one thread each; the single-process references run here, also
with one thread, so that every kernel sums in the same order.
"""
import copy
import dataclasses
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import contsup
from contsup import pipeline
from contsup.pipeline import faults, messages, split, stages, watch as watching
from contsup.cli import main
from contsup.errors import UsageError
from contsup.model import ContSupNet, ModelConfig
from contsup.step import local_learning_step
from contsup.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"epoch_seconds", "images_per_s"}
# K=4 on the smoke-sized digits8: R1E with softmax heads; R2 with contrast heads and
# reconstruction (under --split 2,2 the context at cut 1, on rank 1, encodes the inputs of
# modules 1 and 0, both made on rank 0).
CASES = {"R1E": dict(mode="R1E"), "R2": dict(mode="R2", loss="contrast", reconstruct=True)}


def _cfg(out, case, **kw):
    return TrainConfig(dataset="digits8", arch="resnet32", k=4, epochs=2, warmup_epochs=1, batch_size=32, lr=0.05,
                       train_subset=64, out_dir=str(out), device="cpu", seed=1, **CASES[case], **kw)


def _argv(cfg: TrainConfig) -> list[str]:
    args = ["train", "--dataset", cfg.dataset, "-k", str(cfg.k), "--mode", cfg.mode, "--loss", cfg.loss,
            "--epochs", str(cfg.epochs), "--warmup-epochs", str(cfg.warmup_epochs), "--batch-size",
            str(cfg.batch_size), "--lr", str(cfg.lr), "--train-subset", str(cfg.train_subset), "--out", cfg.out_dir,
            "--device", "cpu", "--seed", str(cfg.seed), "--no-progress"]
    if cfg.arch != "resnet32":
        args += ["--arch", cfg.arch]
    if cfg.loss_scales is not None:
        args += ["--loss-scales", ",".join(map(str, cfg.loss_scales))]
    return args + (["--reconstruct"] if cfg.reconstruct else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cfg: TrainConfig, world: int, *extra: str, env: dict | None = None) -> list[subprocess.Popen]:
    """Start the ranks as torchrun would."""
    port = _free_port()
    procs = []
    for rank in range(world):
        e = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                          "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} | (env or {})
        procs.append(subprocess.Popen([sys.executable, "-m", "contsup", *_argv(cfg), *extra], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _launch(cfg: TrainConfig, world: int, *extra: str, env: dict | None = None, timeout: float = 120):
    """Run the ranks to the end; returns (exit codes, stderr texts, seconds)."""
    procs, t0 = _start(cfg, world, *extra, env=env), time.monotonic()
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], [err for _, err in outputs], time.monotonic() - t0


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """The single-process runs, trained once."""
    root = tmp_path_factory.mktemp("reference")
    for case in CASES:
        train(_cfg(root / case, case), progress=False)
    return {case: root / case for case in CASES}


def _assert_same_run(a: Path, b: Path, epochs: int = 2):
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert ca["epoch"] == cb["epoch"] and list(ca["model"]) == list(cb["model"])
    for name, tensor in ca["model"].items():   # every parameter and buffer
        assert torch.equal(tensor, cb["model"][name]), name
    oa, ob = ca["optimizer"], cb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and sorted(oa["state"]) == sorted(ob["state"])
    for i, state in oa["state"].items():
        assert torch.equal(state["momentum_buffer"], ob["state"][i]["momentum_buffer"]), i
    assert torch.equal(ca["data_rng"], cb["data_rng"]) and ca["best"] == cb["best"]
    rows = lambda d: [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS}  # noqa: E731
                      for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(a) == rows(b) and len(rows(a)) == epochs


def test_two_ranks_equal_the_single_process_trainer(tmp_path, reference):
    cfg = _cfg(tmp_path / "run", "R2")
    codes, errors, _ = _launch(cfg, 2, "--split", "2,2")
    assert codes == [0, 0], errors
    _assert_same_run(reference["R2"], tmp_path / "run")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["world_size"] == 2 and result["stages"] == [0, 2, 4]


def test_two_ranks_equal_the_single_process_trainer_on_a_wrapped_resnet18(tmp_path, one_thread):
    """torchvision's ResNet-18 cut by contsup.wrap (-k 4 on the 32x32 digits): the links are
    sized from the shapes at its cuts. Under --split 2,2 and R2E with reconstruction, rank 1
    gets module 1's output, the labels, the image, the reconstruction target and module 1's
    input (cut 2's residual context); both ranks end bit for bit where one process does."""
    wrapped = dict(arch="torchvision:resnet18", dataset="digits", epochs=1, warmup_epochs=0, mode="R2E",
                   reconstruct=True, loss_scales=(1, 1, 1, 1))
    cfg = dataclasses.replace(_cfg(tmp_path / "run", "R1E"), **wrapped)
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "reference")), progress=False)
    codes, errors, _ = _launch(cfg, 2, "--split", "2,2")
    assert codes == [0, 0], errors
    _assert_same_run(tmp_path / "reference", tmp_path / "run", epochs=1)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["world_size"] == 2 and result["stages"] == [0, 2, 4] and len(result["cuts"]) == 3


def test_world_size_one_runs_the_same_path(tmp_path, reference):
    with pytest.raises(UsageError, match="--split 2,2 is for 2 ranks, but there are 1"):
        pipeline.train_pipelined(_cfg(tmp_path / "run", "R1E"), progress=False, split=[2, 2])
    assert not (tmp_path / "run").exists()
    result = pipeline.train_pipelined(_cfg(tmp_path / "run", "R1E"), progress=False)
    assert result["world_size"] == 1 and result["stages"] == [0, 4]
    _assert_same_run(reference["R1E"], tmp_path / "run")


def test_a_dead_rank_is_named_and_the_checkpoint_resumes_single_process(tmp_path, reference):
    cfg = _cfg(tmp_path / "run", "R2")
    codes, errors, seconds = _launch(cfg, 2, "--split", "1,3", "--rank-timeout", "30",
                                     env={faults.DIE_ENV: "1:1"})
    assert codes == [1, 1], errors
    assert seconds < 60, seconds
    lines = errors[0].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("contsup: error: rank 1 died or hung during epoch 1"), errors[0]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["epoch"] == 0
    # The 2-rank run's checkpoint resumes single-process, and with another G (1), and both
    # end where the reference did.
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    train(cfg, resume=True, progress=False)
    _assert_same_run(reference["R2"], tmp_path / "run")
    pipeline.train_pipelined(_cfg(tmp_path / "again", "R2"), resume=True, progress=False)
    _assert_same_run(reference["R2"], tmp_path / "again")


def _wait_for(procs: list[subprocess.Popen], *paths: Path):
    """Until the `paths` exist (a test hook wrote one), or fail if a rank ended first."""
    while not all(p.exists() for p in paths):
        ended = [p.returncode for p in procs if p.poll() is not None]
        assert not ended, (ended, [p.communicate()[1] for p in procs])
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen]):
    for p in procs:
        p.kill()
        p.communicate()


def test_a_hung_rank_is_named_within_the_timeout(tmp_path):
    # The verdict does not depend on the machine's load: the timeout is generous for epoch 0
    # on a busy machine, the hang comes at epoch 1's start, and the test waits on events:
    # the hook's file, then rank 0's end (its line says which wait ran out, and after how long).
    cfg = _cfg(tmp_path / "run", "R1E")
    hooked = tmp_path / "hooked"
    procs = _start(cfg, 2, "--split", "2,2", "--rank-timeout", "20",
                   env={faults.HANG_ENV: "1:1", faults.HOOK_FILE_ENV: str(hooked)})
    try:
        _wait_for(procs, hooked)
        _, err = procs[0].communicate(timeout=600)   # a guard against a test that never ends, not the verdict
        assert procs[0].returncode == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("contsup: error: rank 1 died or hung during epoch 1 "
                                                       "(seen by rank 0: "), err
        assert "sending to rank 1: no progress for 20 s" in lines[0], err   # our watchdog, not gloo's timeout
        assert procs[1].poll() is None   # the hung rank itself never notices
    finally:
        _stop(procs)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["epoch"] == 0


def test_sigterm_stops_every_rank_in_one_line_and_the_run_resumes(tmp_path, reference):
    # As torchrun stops a run: SIGTERM to every rank, once they are inside epoch 1 (rank 1
    # waits in its hook, rank 0 for rank 1, once it saved epoch 0). Each rank says at most one line, no traceback;
    # the checkpoint of epoch 0 is intact and a rerun with --resume ends where the reference did.
    cfg = _cfg(tmp_path / "run", "R1E")
    hooked = tmp_path / "hooked"
    procs = _start(cfg, 2, "--split", "2,2", env={faults.HANG_ENV: "1:1", faults.HOOK_FILE_ENV: str(hooked)})
    try:
        _wait_for(procs, hooked, tmp_path / "run" / "ckpt.pt")   # rank 0 saved epoch 0 (atomically)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        errors = [p.communicate(timeout=600)[1] for p in procs]   # a guard, not the verdict
    finally:
        _stop(procs)
    for p, err in zip(procs, errors):
        lines = err.strip().splitlines()
        assert p.returncode != 0 and len(lines) <= 1 and "Traceback" not in err, err
        assert not lines or "contsup: stopped by SIGTERM" in lines[0] or "was stopped (Ctrl-C or SIGTERM)" in lines[0], err
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["epoch"] == 0
    pipeline.train_pipelined(cfg, resume=True, progress=False)   # the rerun (here a world of one)
    _assert_same_run(reference["R1E"], tmp_path / "run")


class _Store:
    """The rendezvous store's compare_set, in a dict."""
    def __init__(self):
        self.kv = {}

    def set_timeout(self, timeout):
        pass

    def compare_set(self, key, expected, desired):
        if self.kv.get(key, "") == expected:
            self.kv[key] = desired
        return self.kv[key].encode()


def _watch(rank: int, store) -> watching.Watch:
    """A Watch without a process group (its blame only)."""
    watch = watching.Watch.__new__(watching.Watch)
    watch.rank, watch.world, watch.epoch, watch.store = rank, 3, 1, store
    return watch


def test_the_first_failure_recorded_is_the_one_every_rank_names():
    store = _Store()
    _watch(1, store).interrupted()   # rank 1 stopped by SIGTERM: the others say so
    line = _watch(0, store).message(1, "receiving from rank 1 failed (RuntimeError)")
    assert line.startswith("rank 1 was stopped (Ctrl-C or SIGTERM) during epoch 1 (seen by rank 0: receiving from")
    assert "rerun the same command to resume" in line
    store = _Store()
    with pytest.raises(pipeline.RankFailure, match=r"^rank 2 died or hung during epoch 1 \(seen by rank 1: "):
        _watch(1, store).fail(2, "sending to rank 2 failed")
    _watch(0, store).interrupted()   # too late: rank 2 is the one named
    assert _watch(0, store).message(1, "x").startswith("rank 2 died or hung during epoch 1 (seen by rank 0: x)")


def test_a_single_process_checkpoint_resumes_pipelined(tmp_path, reference, interrupt_in_second_evaluation):
    cfg = _cfg(tmp_path / "run", "R1E")
    interrupt_in_second_evaluation()   # stop in epoch 1, after epoch 0's checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    codes, errors, _ = _launch(cfg, 2, "--resume")   # the split balanced by measured step times
    assert codes == [0, 0], errors
    _assert_same_run(reference["R1E"], tmp_path / "run")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["world_size"] == 2 and len(result["stages"]) == 3


# --------------------------------------------------------------------------------------
def test_balanced_split_minimises_the_slowest_stage():
    gen = torch.Generator().manual_seed(0)
    for k, g in [(4, 2), (6, 3), (8, 4), (5, 5), (7, 1)]:
        seconds = torch.rand(k, generator=gen).tolist()
        bounds = pipeline.balanced_split(seconds, g)
        assert bounds[0] == 0 and bounds[-1] == k and all(a < b for a, b in zip(bounds, bounds[1:]))
        slowest = lambda bs: max(sum(seconds[a:b]) for a, b in zip(bs, bs[1:]))  # noqa: E731
        best = min(slowest([0, *c, k]) for c in itertools.combinations(range(1, k), g - 1))
        assert slowest(bounds) == best
    assert pipeline.balanced_split([1, 1, 1, 5], 2) == [0, 3, 4]
    # a cut that is slow to send across is avoided: [1, 1 | 1, 5] instead
    assert pipeline.balanced_split([1, 1, 1, 5], 2, cut_seconds=[0, 0, 0, 9]) == [0, 2, 4]
    p = pipeline.predicted_speedup([1, 1, 1, 5], [0, 3, 4])
    assert p["stage_costs"] == [3, 5] and p["speedup"] == 8 / 5 and p["bubble"] == pytest.approx(0.2)
    assert pipeline.predicted_speedup([1, 1], [0, 1, 2], batches=3)["speedup"] == pytest.approx(6 / 4)


@pytest.mark.parametrize("mode, loss, reconstruct", [("R1E", "softmax", False), ("R2", "contrast", True)])
def test_stages_run_the_steps_loop_cut_by_rank(mode, loss, reconstruct):
    """stage_step over modules [0, 1), [1, 4) is local_learning_step's loop (the one loop,
    ContSupNet.run_modules) cut in two: the same logits, losses and gradients, bit for bit;
    in eval mode, the same logits as the network's forward."""
    torch.manual_seed(0)
    net = ContSupNet(ModelConfig(dataset="digits8", k=4, mode=mode, loss=loss, reconstruct=reconstruct))
    staged = copy.deepcopy(net)
    x, y, image = torch.randn(6, 3, 8, 8), torch.arange(6), torch.rand(6, 3, 8, 8) if reconstruct else None
    logits, losses = local_learning_step(net, x, y, image)
    inputs = []
    h, first = stages.stage_step(staged, range(0, 1), None, stages.Batch(x, y, image, inputs), True)
    out, rest = stages.stage_step(staged, range(1, 4), h, stages.Batch(x, y, image, inputs), True)
    assert torch.equal(out, logits) and torch.equal(torch.stack(first + rest), losses)
    grads = [(p.grad, q.grad) for p, q in zip(net.parameters(), staged.parameters())]
    assert all(g is None and h is None or torch.equal(g, h) for g, h in grads)   # None: a head weighted 0
    assert sum(g is not None for g, _ in grads) > len(grads) // 2
    staged.eval()
    with torch.no_grad():
        assert torch.equal(stages.stage_step(staged, range(4), None, stages.Batch(x, y, None, []), False)[0], staged(x))


def test_links_carry_what_later_ranks_need():
    net = ContSupNet(ModelConfig(dataset="digits8", k=4, mode="R2", reconstruct=True, loss_scales=(1, 1, 1, 1)))
    # modules [0], [1], [2, 3]: cut 1 (module 2) reads the inputs of modules 1 and 0 (the image)
    bounds = [0, 1, 2, 4]
    assert messages.link_slots(net, bounds, 0) == ["h", "y", "x", "image"]
    assert messages.link_slots(net, bounds, 1) == ["h", "y", "x", "image", ("in", 1)]
    r1 = ContSupNet(ModelConfig(dataset="digits8", k=4, mode="R1"))   # cut 1 encodes module 1's input
    assert messages.link_slots(r1, [0, 2, 4], 0) == ["h", "y", ("in", 1)]
    assert messages.link_slots(ContSupNet(ModelConfig(dataset="digits8", k=4, mode="R0")), [0, 2, 4], 0) == ["h", "y"]
    owners = {messages.module_of(n, 4) for n in net.state_dict()}
    assert owners == {0, 1, 2, 3} and messages.module_of("context.0.image.net.0.0.weight", 4) == 1


def _wrapped_or_paper(family: str) -> ContSupNet:
    """R2E with reconstruction, K=4: the paper's ResNet-32 (8x8 digits), a torchvision
    ResNet-18 (feature maps) or a small ViT (tokens [B, N, D]) cut by contsup.wrap (32x32)."""
    import torchvision
    torch.manual_seed(0)
    kw = dict(mode="R2E", reconstruct=True, loss_scales=(1, 1, 1, 1))
    if family == "resnet32":
        return ContSupNet(ModelConfig(dataset="digits8", k=4, **kw))
    model = torchvision.models.resnet18(num_classes=10) if family == "resnet18" else \
        torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32,
                                             mlp_dim=64, num_classes=10)
    return contsup.wrap(model, cuts=4, image_size=32, **kw)


@pytest.mark.parametrize("family", ["resnet32", "resnet18", "vit"])
def test_links_are_sized_from_the_shapes_at_the_cuts_and_carry_a_step_bit_for_bit(family):
    """The link 0 -> 1 of --split 2,2 is sized from the shapes the net recorded at its cuts
    (each slot exactly one sample's bytes), for the paper's ResNet and wrapped nets alike;
    a training step sent through it in one message equals local_learning_step bit for bit."""
    net = _wrapped_or_paper(family).train()
    staged, bounds, size = copy.deepcopy(net), [0, 2, 4], net.shapes[0][-1]
    gen = torch.Generator().manual_seed(1)
    x, image = torch.randn(6, 3, size, size, generator=gen), torch.rand(6, 3, size, size, generator=gen)
    y = torch.arange(6)
    logits, losses = local_learning_step(net, x, y, image)
    inputs = []
    h, first = stages.stage_step(staged, range(0, 2), None, stages.Batch(x, y, image, inputs), True)
    slots = messages.link_slots(staged, bounds, 0)
    assert slots == ["h", "y", "x", "image", ("in", 1)]   # cut 2 encodes module 1's input
    tensors = [{"h": h, "y": y, "x": x, "image": image}[s] if isinstance(s, str) else inputs[s[1]] for s in slots]
    assert [messages.slot_sample_bytes(staged, bounds, 0, s) for s in slots] == \
        [t[0].numel() * t.element_size() for t in tensors]
    buf = torch.empty(messages.message_bytes(staged, bounds, 0, max_batch=6), dtype=torch.uint8)
    messages.pack(buf, (messages.TRAIN, 0, 0, 6), tensors)   # asserts that the message fits
    got = dict(zip(slots, messages.unpack(buf, len(slots))[1]))
    batch = stages.Batch(got["x"], got["y"], got["image"], [got["x"], got[("in", 1)]])
    out, rest = stages.stage_step(staged, range(2, 4), got["h"], batch, True)
    assert torch.equal(out, logits) and torch.equal(torch.stack(first + rest), losses)
    assert all(g is None and q is None or torch.equal(g, q)
               for g, q in ((p.grad, q.grad) for p, q in zip(net.parameters(), staged.parameters())))


def test_messages_keep_values_dtypes_and_memory_format():
    x = torch.randn(3, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    tensors = [x, torch.arange(3), None, torch.randn(3, 2, 4, 4).to(torch.bfloat16)]
    buf = torch.empty(4096, dtype=torch.uint8)
    messages.pack(buf, (messages.EVAL, 7, 2, 3), tensors)
    head, out = messages.unpack(buf, len(tensors))
    assert head == (messages.EVAL, 7, 2, 3) and out[2] is None
    for a, b in zip(tensors, out):
        if a is not None:
            assert torch.equal(a, b) and a.dtype == b.dtype and a.stride() == b.stride()


def test_message_headers_are_written_on_the_device_without_a_host_copy():
    # On a meta buffer (standing in for a GPU's): after the first message of a layout, a
    # message is device ops only: no tensor on the CPU, no copy from it.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.cpu = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops.append(str(func))
            leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if torch.is_tensor(t)]
            self.cpu += [str(func) for t in leaves if t.device.type == "cpu"]
            return out

    buf, layouts = torch.empty(4096, dtype=torch.uint8, device="meta"), {}
    tensors = [torch.empty(3, 5, 4, 4, device="meta").contiguous(memory_format=torch.channels_last),
               torch.empty(3, dtype=torch.int64, device="meta"), None]
    messages.pack(buf, (messages.TRAIN, 0, 0, 3), tensors, layouts)
    for step in (1, 2):
        with Ops() as mode:
            messages.pack(buf, (messages.TRAIN, 0, step, 3), tensors, layouts)
        assert mode.cpu == [] and len(layouts) == 1, mode.ops
        copies = [op for op in mode.ops if op.startswith("aten.copy_")]
        assert len(copies) == 3 and mode.ops.count("aten.fill_.Scalar") == 2, mode.ops   # header + 2 tensors


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    torchrun = {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert pipeline.rank_device("cuda", torchrun) == torch.device("cuda", 1)
    assert pipeline.rank_device("auto", torchrun) == torch.device("cuda", 1)
    assert pipeline.rank_device("cpu", torchrun) == torch.device("cpu")
    assert pipeline.rank_device("cuda:1", {}) == torch.device("cuda", 1)   # alone, as asked
    assert pipeline.rank_device("cuda", {}) == torch.device("cuda", 0)
    with pytest.raises(UsageError, match="--device cuda:0 would put all 2 ranks on one GPU; use --device cuda"):
        pipeline.rank_device("cuda:0", torchrun)
    with pytest.raises(UsageError, match="LOCAL_RANK 2 but 2 CUDA GPUs are visible"):
        pipeline.rank_device("cuda", {"WORLD_SIZE": "3", "LOCAL_RANK": "2"})


def test_module_times_wait_for_the_gpu(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    gpu = type("Like", (), {"device": torch.device("cuda", 1)})()
    stages.clock(gpu)
    stages.clock(torch.zeros(1))
    assert synced == [torch.device("cuda", 1)]   # on the CPU nothing changes


def test_describe_prints_the_split_from_counted_flops_and_what_each_split_is_for(capsys, one_thread, monkeypatch):
    monkeypatch.setattr(split, "profile_modules", None)   # describe counts, it does not time
    assert main(["describe", "--dataset", "digits8", "-k", "4", "--no-memory", "--stages", "2"]) == 0
    out = capsys.readouterr().out
    assert "stage costs from counted FLOPs" in out and "at batch 256 (not timed" in out
    assert "balanced: modules per rank [" in out and "the fewest GFLOPs on the busiest rank" in out
    assert "equal: modules per rank [2, 2] (`train --split 2,2`)" in out and "predicted speed-up" in out
    assert main(["describe", "--dataset", "digits8", "-k", "2", "--no-memory", "--stages", "3"]) == 2
    capsys.readouterr()
    # a wrapped model: its modules' FLOPs counted the same way
    assert main(["describe", "--arch", "torchvision:resnet18", "--dataset", "digits", "-k", "4", "--no-memory",
                 "--stages", "2", "--json"]) == 0
    stages_ = json.loads(capsys.readouterr().out)["stages"]
    assert len(stages_["module_gflops"]) == 4 and all(f > 0 for f in stages_["module_gflops"])
    assert stages_["equal"]["bounds"] == [0, 2, 4] and stages_["balanced"]["speedup"] >= stages_["equal"]["speedup"]
