"""The grid over many devices and machines: `reproduce --devices`, `--shard I/N`, `--report`.

Sharding and the queue are checked on the paper and quick registries without training;
the rest trains a handful of smoke runs on the CPU."""
import json
import math
import os
import random
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from contsup import jsonio
from contsup.runlock import run_lock
from contsup.study import experiments, grid, kernels, reproduce
from contsup.cli import main


@pytest.fixture(scope="module", params=["paper", "quick"])
def registry(request, tmp_path_factory):
    """A profile's runs with their costs. The paper profile is ordered by FLOPs in
    `reproduce`, whose counting takes minutes on a CPU; a partition is a partition whatever
    the costs, so the proxy stands in here."""
    runs = experiments.expand_all(request.param, tmp_path_factory.mktemp(request.param))
    return runs, {r.name: float(grid.proxy_cost(r.config)) for r in runs}


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_shards_partition_the_runs_and_are_balanced(registry, count):
    runs, cost = registry
    parts = [grid.shard_runs(runs, i, count, cost) for i in range(1, count + 1)]
    names = [r.name for part in parts for r in part]
    assert sorted(names) == sorted(r.name for r in runs) and len(set(names)) == len(runs)
    totals = [sum(cost[r.name] for r in part) for part in parts]
    assert max(totals) - min(totals) <= max(cost.values())  # dealt 1..N, N..1: within one run
    shuffled = random.Random(count).sample(runs, len(runs))  # the same parts whatever the order
    assert [grid.shard_runs(shuffled, i, count, cost) for i in range(1, count + 1)] == parts


def test_queue_hands_out_longest_first_in_shrinking_chunks(registry):
    runs, cost = registry
    queue = grid.RunQueue(runs, cost, slots=2, per_run=False)
    chunks = []
    while (batch := queue.take()[1]):
        chunks.append(batch)
    order = [r.name for chunk in chunks for r in chunk]
    assert order == [r.name for r in sorted(runs, key=lambda r: (-cost[r.name], r.name))]
    assert len(chunks[-1]) == 1 and cost[chunks[-1][0].name] == min(cost.values())
    assert len(chunks[0]) > 1 and len(chunks) < len(runs) / 2  # far fewer kernel starts than runs
    one_slot = grid.RunQueue(runs, cost, slots=1, per_run=False)
    assert len(one_slot.take()[1]) == len(runs) and one_slot.take()[1] == []
    per_run = grid.RunQueue(runs, cost, slots=2, per_run=True)
    assert [len(per_run.take()[1]) for _ in range(3)] == [1, 1, 1]


def test_devices_become_slots():
    assert grid.parse_devices("cpu", "quick", 3) == ["cpu"] * 3
    assert grid.parse_devices("cpu", "paper") == ["cpu"]
    assert grid.parse_devices(["cpu", "cpu"], "smoke", 1) == ["cpu", "cpu"]


@pytest.mark.parametrize("argv,hint", [
    (["--shard", "0/3"], "1 <= I <= N"),
    (["--shard", "4/3"], "1 <= I <= N"),
    (["--shard", "x"], "1 <= I <= N"),
    (["--shard", "1/0"], "1 <= I <= N"),
    (["--devices", "gpu"], "--devices takes auto, cpu"),
    (["--devices", "cuda:x"], "--devices takes auto, cpu"),
    (["--devices", ""], "--devices takes auto, cpu"),
    (["--devices", "cpu,cuda:99"], "cuda:99"),
    (["--devices", "cpu", "--jobs", "-1"], "--jobs must be a positive integer"),
    (["--report", "--shard", "1/2"], "drop --shard"),
    (["--report"], "no finished runs"),
])
def test_bad_shard_devices_or_report_exit_2_and_write_nothing(argv, hint, tmp_path, capsys):
    assert main(["reproduce", "--profile", "smoke", "--out", str(tmp_path / "out")] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("contsup: error: ") and err.count("\n") == 1 and hint in err
    assert not (tmp_path / "out").exists()


def test_failing_run_does_not_stop_the_other_slots(tmp_path):
    """Two CPU slots, one notebook per run; the costliest run (taken first) is broken (CIFAR-10
    in an empty data folder, which only train() finds out): every other run is still trained."""
    good = experiments.expand("table1", "smoke", tmp_path)[:3]
    costliest = max(good, key=lambda r: grid.proxy_cost(r.config))
    cfg = replace(costliest.config, dataset="cifar10", data_root=str(tmp_path / "no-data"),
                  out_dir=str(tmp_path / "runs" / "broken"))
    broken = experiments.Run("table1", "broken", cfg, "cifar10", "resnet32")
    costs = {r.name: grid.proxy_cost(r.config) for r in good + [broken]}
    assert costs["broken"] == max(costs.values())
    rows = grid.run_all(good + [broken], tmp_path, notebook_per="run", progress=False,
                             slots=["cpu", "cpu"])
    status = {r["name"]: r for r in rows}
    assert status["broken"]["status"] == "failed" and "cifar10" in status["broken"]["error"]
    assert [status[r.name]["status"] for r in good] == ["done"] * 3
    assert {r["slot"] for r in rows} == {0, 1} and {r["device"] for r in rows} == {"cpu"}
    for r in good:  # the slot's device reached the run
        assert json.loads((r.out_dir / "config.json").read_text())["device"] == "cpu"


def test_shards_then_report(tmp_path, capsys):
    """Two machines' worth of shards on one folder, one of them run: it trains its half and no
    tables; --report then builds them from that half, trains nothing and names the rest."""
    out = tmp_path / "shared"
    summary = reproduce.reproduce("smoke", out, only=["table1"], shard="2/2", progress=False, devices="cpu", jobs=1)
    mine = {r["name"] for r in summary["runs"]}
    assert len(mine) == 2 and summary["done"] == 2 and summary["notebooks"] == []
    assert (out / "summary-shard2of2.json").exists() and not (out / "summary.json").exists()
    assert not (out / "notebooks" / "03_tables.ipynb").exists()
    assert "--report" in capsys.readouterr().out
    finished = sorted(p.parent.name for p in out.glob("runs/*/result.json"))
    assert finished == sorted(mine)

    report = reproduce.reproduce("smoke", out, only=["table1"], report=True, progress=False)
    assert sorted(p.parent.name for p in out.glob("runs/*/result.json")) == finished  # nothing trained
    assert (report["done"], report["missing"], report["exit_code"]) == (2, 2, 0)
    assert [n["notebook"] for n in report["notebooks"]] == ["03_tables.ipynb", "04_figures.ipynb"]
    assert all(n["status"] == "done" for n in report["notebooks"])
    printed = capsys.readouterr().out
    missing = {r["name"] for r in report["runs"] if r["status"] == "missing"}
    assert missing and missing.isdisjoint(mine) and all(name in printed for name in missing)
    assert json.loads((out / "summary.json").read_text())["missing"] == 2


def test_summary_is_strict_json(tmp_path):
    jsonio.save(tmp_path / "s.json", {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_gpu_slots_see_only_their_gpu_and_data_is_downloaded_once(tmp_path, monkeypatch):
    """Issue 15: a slot's GPU travelled only in the run's config (stray CUDA contexts on
    cuda:0), and every paper run downloaded into one data folder at once. Four fake GPUs, of
    which this process sees physical 1,3,5,7 (as SLURM sets CUDA_VISIBLE_DEVICES); a fake
    executor records what each notebook process would get."""
    monkeypatch.setattr(grid.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3,5,7")
    assert grid.parse_devices("auto", "paper") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    slots = grid.parse_devices("cuda:1,cuda:2", "paper", 2)
    assert slots == ["cuda:1", "cuda:2", "cuda:1", "cuda:2"]
    downloads, executed = [], {}

    def fake_download(name, root):
        downloads.append((name, root))
        (Path(root) / f"{name}_uint8.pt").write_bytes(b"")

    def fake_execute(notebook, output, parameters, env=None):
        for cfg in parameters["runs"]:
            executed[Path(cfg["out_dir"]).name] = (env, cfg, len(downloads))
            (Path(cfg["out_dir"]) / "result.json").write_text(json.dumps({"train_seconds": 1.0}))
        return None

    monkeypatch.setattr(grid.data, "download", fake_download)
    monkeypatch.setattr(kernels, "execute", fake_execute)
    data = tmp_path / "data"

    def cifar_runs(folder):
        return [replace(r, config=replace(r.config, dataset="cifar10", download=True, data_root=str(data)))
                for r in experiments.expand("table1", "smoke", tmp_path / folder)]

    rows = grid.run_all(cifar_runs("first"), tmp_path, notebook_per="run", progress=False, slots=slots)
    assert downloads == [("cifar10", str(data))]  # once, for all runs and slots
    assert [r["status"] for r in rows] == ["done"] * 4
    for row in rows:
        env, cfg, downloaded = executed[row["name"]]
        assert downloaded == 1 and cfg["download"] is False  # before any notebook; runs don't download
        assert cfg["device"] == "cuda"  # the only GPU its process sees
        assert row["gpu"] == {"cuda:1": 3, "cuda:2": 5}[row["device"]]  # the physical GPU
        assert env["CUDA_VISIBLE_DEVICES"] == str(row["gpu"])
    rows = grid.run_all(cifar_runs("second"), tmp_path, notebook_per="run", progress=False, slots=slots)
    assert [r["status"] for r in rows] == ["done"] * 4 and len(downloads) == 1  # present: not fetched again

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # nothing set: cuda:N is physical GPU N
    env, gpu, device = grid.slot_environment("cuda:2", None)
    assert (env["CUDA_VISIBLE_DEVICES"], gpu, device) == ("2", 2, "cuda")
    env, gpu, device = grid.slot_environment("cpu", None)
    assert (gpu, device) == (None, "cpu") and "CUDA_VISIBLE_DEVICES" not in env


def test_a_run_another_process_holds_is_waited_for_not_trained(tmp_path, monkeypatch):
    """A run folder whose lock another writer holds (a `train` started by hand, a notebook
    orphaned by a killed reproduce) is passed over, waited for, and its result taken: it is
    never handed to a notebook. The writer here is a thread holding the lock until the other
    run has been executed; it finishes its run before letting go."""
    held, free = experiments.expand("table1", "smoke", tmp_path)[:2]
    executed, locked, release = [], threading.Event(), threading.Event()

    def fake_execute(notebook, output, parameters, env=None):
        for cfg in parameters["runs"]:
            executed.append(Path(cfg["out_dir"]).name)
            (Path(cfg["out_dir"]) / "result.json").write_text(json.dumps({"train_seconds": 1.0}))
        release.set()

    def writer():
        with run_lock(held.out_dir):
            locked.set()
            release.wait()
            result = {"train_seconds": 2.0, "config": grid.notebook_config(held.config)}
            (held.out_dir / "result.json").write_text(json.dumps(result))

    monkeypatch.setattr(kernels, "execute", fake_execute)
    thread = threading.Thread(target=writer)
    thread.start()
    locked.wait()
    cost = {held.name: 2.0, free.name: 1.0}  # the held run first: it is passed over, the other one trained
    rows = grid.run_all([held, free], tmp_path, notebook_per="run", progress=False, cost=cost)
    thread.join()
    status = {r["name"]: r for r in rows}
    assert executed == [free.name]
    assert status[free.name]["status"] == "done"
    assert status[held.name]["status"] == "elsewhere" and status[held.name]["train_seconds"] == 2.0
    assert f"pid {os.getpid()} " in status[held.name]["trained_by"]  # the writer, named by its lock
