"""The benchmark results file: written while rows arrive, read back, summarised again across several files."""
import json

from benchmarks.report import Results, main, read_json, summary_lines

ENV = {"device": "test device", "date": "2026-01-01 00:00 UTC", "torch": "x", "triton": "y", "cuda": None,
       "transformers": "z", "python": "3", "copy_gbps": 100.0}


def _op_row(impl: str, mode: str, shape: str, ms: float) -> dict:
    return dict(impl=impl, mode=mode, shape=shape, rows=1500, dim=384, experts=4, dtype="bf16", headline=False,
                interpreted=False, ms=ms, gbps=1.0, copy_pct=1.0, vs_eager=2.0, vs_compile=1.5, vs_original=3.0)


def test_rows_are_saved_while_they_arrive(tmp_path):
    path = tmp_path / "op.json"
    res = Results(str(path), save_every_s=0.0)
    res.env.update(ENV)
    res.add("op", _op_row("triton", "fwd", "1500x384-E4-bf16", 0.25))
    assert json.loads(path.read_text())["rows"][0]["ms"] == 0.25   # on disk before the session ends
    res.add("op", _op_row("triton", "bwd", "1500x384-E4-bf16", 0.5))
    assert len(json.loads(path.read_text())["rows"]) == 2


def test_no_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = Results(save_every_s=0.0)
    res.add("op", _op_row("triton", "fwd", "s", 1.0))
    res.save()
    assert list(tmp_path.iterdir()) == []


def test_stages_are_summarised_together(tmp_path, capsys):
    shapes = [f"{1500 * b}x384-E4-bf16" for b in range(1, 15)]   # more than the default shape lines
    op, models = Results(str(tmp_path / "op.json")), Results(str(tmp_path / "models.json"))
    for res in (op, models):
        res.env.update(ENV)
    for i, shape in enumerate(shapes):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            op.add("op", _op_row("cuda", mode, shape, 0.1 * (i + 1)))
    models.add("encoder", dict(config="c", variant="unsteered, 30 s", batch=2, mel_frames=3000, dtype="fp32",
                               ms=10.0))
    models.add("encoder", dict(config="c", variant="steered, 30 s", batch=2, mel_frames=3000, dtype="fp32",
                               ms=10.5))
    op.save()
    models.save()

    merged = read_json([str(tmp_path / "op.json"), str(tmp_path / "models.json")])
    assert merged.env["device"] == "test device" and len(merged.rows) == 3 * len(shapes) + 2
    default = "\n".join(summary_lines(merged))
    assert "geomean of 14 shapes" in default and shapes[-1] not in default
    main(["--all-shapes", str(tmp_path / "op.json"), str(tmp_path / "models.json")])
    printed = capsys.readouterr().out
    assert all(shape in printed for shape in shapes) and "geomean" not in printed
    steered = next(line for line in printed.splitlines() if line.split()[:3] == ["c", "steered,", "30"])
    assert "test device" in printed and steered.split()[-1] == "5"   # % over unsteered
