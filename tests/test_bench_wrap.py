"""benchmarks/bench_wrap.py at a tiny size: every target row gets both clocks (the
local-learning step and the whole training step with the optimizer's), the judged ratios
are those of the rows, and the README's tables render from the JSON it wrote."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_wrap = pytest.importorskip("bench_wrap", reason="benchmarks/bench_wrap.py imports torchvision")


def test_bench_wrap_records_both_clocks_and_judges_them(tmp_path, capsys):
    out = tmp_path / "wrap.json"
    bench_wrap.main(["--batch", "2", "--reps", "2", "--threads", "1", "--models", "small_vit", "--no-ks",
                     "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["targets"]["rows"]
    assert [(r["k"], r["mode"]) for r in rows] == bench_wrap.TARGET_ROWS
    for r in rows:
        assert len(r["times"]) == len(r["train_step_times"]) == 2
        # the whole step contains the local-learning step, measured from the same start
        assert all(t <= total for t, total in zip(r["times"], r["train_step_times"]))
    e2e, r1e = rows[0], rows[-1]
    judged = result["targets"]["judged"]["small_vit"]["R1E_K4_vs_E2E"]
    assert judged["time"] == pytest.approx(r1e["step_seconds"] / e2e["step_seconds"])
    assert judged["train_step_time"] == pytest.approx(r1e["train_step_seconds"] / e2e["train_step_seconds"])
    capsys.readouterr()
    bench_wrap.main(["--markdown", "--out", str(out)])
    table = capsys.readouterr().out
    assert "s/step (with SGD)" in table and table.count("| small_vit |") == len(rows)
