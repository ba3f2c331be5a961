"""The benchmark results file: written while rows arrive, read back, summarised again across several files."""
import json

from benchmarks.report import Results, _target_checks, main, read_json, summary_lines

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


def _headline(impl: str, mode: str, ms: float, copy_pct: float, rows: int = 24000, **speedups) -> dict:
    return {**_op_row(impl, mode, f"{rows}x1280-E8-bf16", ms), "rows": rows, "dim": 1280, "experts": 8,
            "headline": True, "copy_pct": copy_pct, "vs_eager": None, "vs_compile": None, "vs_original": None,
            **speedups}


def test_targets_are_judged_on_the_worst_case():
    res = Results()
    res.env.update(ENV)
    for impl, ms, pct in (("eager", 0.5, 20.0), ("triton", 0.1, 95.0), ("cuda", 0.112, 85.0)):
        res.add("op", _headline(impl, "fwd", ms, pct))
        res.add("op", _headline(impl, "bwd", 2 * ms, pct - 20))
        res.add("op", _headline(impl, "fwd+bwd", 3 * ms, pct - 10, vs_eager=1.5 / (3 * ms), vs_compile=1.4,
                                vs_original=6.0))
    res.add("op", _headline("triton", "fwd", 0.1, 91.0, rows=48000))          # a second headline shape, worse
    res.add("op", _headline("eager", "fwd", 0.5, 20.0, rows=48000))
    res.add("op", _headline("cuda", "fwd", 0.2, 50.0, rows=48000))
    res.add("memory", dict(impl="triton", dim=1280, experts=8, dtype="bf16", bytes_per_row=2592.0,
                           beyond_y_per_row=32.0, target_rows=24000, target_layers=32, layer_mb=0.77, model_gb=0.02))
    res.add("encoder", dict(config="whisper-large-v3 shapes", variant="unsteered, 30 s", batch=8, mel_frames=3000,
                            dtype="bf16", ms=100.0))
    res.add("encoder", dict(config="whisper-large-v3 shapes", variant="steered, 30 s", batch=8, mel_frames=3000,
                            dtype="bf16", ms=104.0))
    res.add("train", dict(pipeline="steermoe", config="whisper-large-v3 shapes", padding="p", batch=8, ms=100.0,
                          samples_per_s=80.0, peak_mb=1.0, trainable=1))
    res.add("train", dict(pipeline="original", config="whisper-large-v3 shapes", padding="p", batch=8, ms=400.0,
                          samples_per_s=20.0, peak_mb=1.0, trainable=1))
    for padding, ms in (("30 s", 30.0), ("none", 10.0)):
        res.add("clip", dict(config="small", seconds=5, padding=padding, mel_frames=1, dtype="fp32", ms=ms))
    verdicts = {text: (value, met) for text, value, met in _target_checks(res)}
    assert verdicts["triton fwd %copy ≥ 90 (headline shapes)"] == (91.0, True)       # the worse of 95 and 91
    assert verdicts["triton bwd %copy ≥ 80 (headline shapes)"] == (75.0, False)
    assert verdicts["triton fwd+bwd ≥ 1.5× compile (headline shapes)"] == (1.4, False)
    assert verdicts["cuda fwd %copy ≥ 90 (headline shapes)"] == (50.0, False)
    assert verdicts["triton fwd+bwd ≥ 3× eager (headline shapes)"][1] is True       # 1.5 / 0.3 = 5
    assert verdicts["cuda fwd+bwd ≥ 3× eager (headline shapes)"][1] is True         # 1.5 / 0.336 ≈ 4.5
    ratio, met = verdicts["cuda fwd time ≤ 1.15× triton's (headline shapes)"]
    assert abs(ratio - 2.0) < 1e-9 and not met                                      # 0.2 / 0.1 at 48000 rows
    assert verdicts["cuda bwd time ≤ 1.15× triton's (headline shapes)"][1] is True   # 0.224 / 0.2
    assert verdicts["cuda never slower than eager (every shape and mode: ×eager)"][1] is True
    assert verdicts["triton saves E·4 = 32 B/row beyond y"] == (32.0, True)
    overhead, met = verdicts["encoder steering overhead ≤ 1 % (fused residual; whisper-large-v3 shapes, 30 s)"]
    assert abs(overhead - 4.0) < 1e-9 and not met
    assert verdicts["train step ≥ 3× the original's samples/s (whisper-large-v3 shapes)"] == (4.0, True)
    assert verdicts["a 5 s clip encodes ≥ 4× faster unpadded than padded to 30 s (small)"] == (3.0, False)
    assert not any(text.startswith("eager") for text in verdicts)                   # baselines are not judged
    assert "MISSED" in "\n".join(summary_lines(res))
