"""python -m train.plot: one figure of several runs, its panels found from what they logged
(the figure of a real run is checked in tests/test_downstream.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.plot import main
from train.run.figure import draw, run_records


def write_run(root: Path, name: str, mixture: bool) -> Path:
    run = root / name
    run.mkdir()
    records = []
    for step in range(0, 21, 5):
        if step:
            records.append({"step": step, "loss": 5 - step / 10, "lr": 1e-3, "tokens_per_s": 1e4,
                            "mfu": 0.4, "grad_norm": 1.0})
        if step % 10 == 0:
            ev = {"step": step, "eval_loss": 5 - step / 20, "perplexity": 2.0 ** (8 - step / 5)}
            if mixture:
                ev.update({"eval_loss/code": 4.0, "eval_loss/prose": 6.0})
            records.append(ev)
    records.append({"step": 20, "downstream/stdlib_next_line/acc": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_several_runs_overlaid_in_one_figure_png_and_svg(tmp_path, capsys):
    a, b = write_run(tmp_path, "a", mixture=True), write_run(tmp_path, "b", mixture=False)
    out = tmp_path / "compare.png"
    assert main([str(a), str(b), "--out", str(out), "--svg"]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".svg"))]
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in out.with_suffix(".svg").read_text()[:500]
    fig = draw({"a": run_records(a), "b": run_records(b)})
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == ["loss", "eval perplexity", "learning rate", "throughput", "MFU",
                          "eval loss per source", "downstream stdlib_next_line/acc"]
    assert [t.get_text() for t in axes["eval loss per source"].get_legend().get_texts()] == \
        ["a code", "a prose"]  # only run a is a mixture
    assert len(axes["MFU"].get_lines()) == 2 and axes["eval perplexity"].get_yscale() == "log"


def test_a_directory_without_metrics_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl does not exist" in err[0]
