"""The `audiocnn predict` command: formats, top-k, timeline, errors and exit codes, a live stream through a pipe."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from audiocnn import cli, predict
from conftest import tool_env
from test_predict import LABELS, make_model_dir, pcm, write_wav


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("cli") / "models")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    write_wav(root / "a.wav", 1.6, freq=300.0)
    write_wav(root / "sub" / "b.flac", 0.9, rate=16000, channels=1, freq=2000.0)
    return root


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_is_the_default_off_a_terminal_with_top_k(capsys, tmp_path, model_dir, clips):
    code, out, err = run_cli(capsys, clips, "--model", model_dir, "--top-k", "2", "--params", tmp_path / "none.yaml")
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["path"]).relative_to(clips).as_posix() for r in results] == ["a.wav", "sub/b.flac"]
    for r in results:
        assert len(r["top"]) == 2 and r["top"][0] == {"label": r["label"], "probability": r["probability"]}
        assert r["top"][0]["probability"] >= r["top"][1]["probability"] and r["label"] in LABELS
        assert "timeline" not in r
    expected = predict.predict_file(predict.load_model(model_dir), clips / "a.wav", 0.25)
    # no hop stored with the model and no params file: half the 0.5 s window
    assert results[0]["probability"] == pytest.approx(float(expected.probabilities.max()), abs=1e-12)
    assert results[0]["windows"] == 6 and results[0]["duration_s"] == pytest.approx(1.6, abs=1e-3)
    code, out, _ = run_cli(capsys, clips / "a.wav", "--model", model_dir, "--top-k", "9", "--format", "json")
    top = json.loads(out)["top"]
    assert [t["label"] for t in top] == sorted(LABELS, key=lambda l: -next(t["probability"] for t in top
                                                                            if t["label"] == l))
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)


def test_csv_rows_for_files_windows_and_events(capsys, model_dir, clips):
    code, out, _ = run_cli(capsys, clips / "a.wav", "--model", model_dir, "--format", "csv", "--timeline",
                           "--hop", "0.5")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == cli.CSV_COLUMNS
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "file" and kinds.count("window") == 4 and kinds.count("event") >= 1
    windows = [r for r in rows if r["kind"] == "window"]
    assert [(float(r["start_s"]), float(r["end_s"])) for r in windows] == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5),
                                                                          (1.1, 1.6)]
    events = [r for r in rows if r["kind"] == "event"]
    assert float(events[0]["start_s"]) == 0.0 and float(events[-1]["end_s"]) == 1.6
    assert rows[0]["top"].count(":") == 3 and rows[0]["label"] in LABELS


def test_table_for_people(capsys, model_dir, clips):
    code, out, _ = run_cli(capsys, clips / "a.wav", "--model", model_dir, "--format", "table", "--timeline")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[0] in LABELS and str(clips / "a.wav") in lines[0]
    assert lines[1].strip().startswith("0.00-0.50 s") and any(line.startswith("  event: ") for line in lines)


def test_threshold_and_target_filter_the_timeline(capsys, model_dir, clips):
    code, out, _ = run_cli(capsys, clips / "a.wav", "--model", model_dir, "--target", "storm", "--threshold", "0",
                           "--hop", "0.25")
    result = json.loads(out)
    assert code == 0 and len(result["timeline"]) == result["windows"] == 6  # --target implies --timeline
    assert {w["label"] for w in result["timeline"]} == {"storm"}
    assert result["events"] == [{"label": "storm", "start_s": 0.0, "end_s": 1.6, "windows": 6,
                                 "probability": pytest.approx(np.mean([w["probability"] for w in result["timeline"]])),
                                 "peak": max(w["probability"] for w in result["timeline"])}]
    code, out, _ = run_cli(capsys, clips / "a.wav", "--model", model_dir, "--threshold", "0.999")
    assert code == 0 and json.loads(out)["timeline"] == [] and json.loads(out)["events"] == []


def test_bad_files_are_named_and_the_rest_predicted(capsys, tmp_path, model_dir, clips):
    text = tmp_path / "notes.wav"
    text.write_text("hello", encoding="utf-8")
    code, out, err = run_cli(capsys, text, clips / "a.wav", tmp_path / "missing.flac", "--model", model_dir)
    assert code == 1
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(clips / "a.wav")]
    errors = err.strip().splitlines()
    assert len(errors) == 2 and "notes.wav" in errors[0] and "missing.flac" in errors[1]
    assert all(line.startswith("audiocnn predict: error: cannot read audio") for line in errors)


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "{tmp}/nowhere"], "model not found: {tmp}/nowhere"),
    (["--window", "2"], "takes fixed 0.5 s windows"),
])
def test_model_problems_are_usage_errors(capsys, tmp_path, model_dir, clips, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    code, out, err = run_cli(capsys, clips / "a.wav", *(["--model", str(model_dir)] + args))
    assert code == 2 and out == "" and message.format(tmp=tmp_path) in err


@pytest.mark.parametrize("args", [[], ["x.wav", "--stream"], ["x.wav", "--threshold", "1.5"], ["x.wav", "--top-k", "0"],
                                  ["x.wav", "--target", "rain"], ["x.wav", "--format", "xml"]])
def test_bad_options_exit_2(capsys, model_dir, args):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--model", str(model_dir), *args])
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_stream_through_a_pipe_prints_each_window_as_it_completes(model_dir):
    """`<pcm> | audiocnn predict --stream`: the first line comes while stdin is still open."""
    _, payload = pcm(1.3)
    command = [str(Path(sys.executable).parent / "audiocnn"), "predict", "--stream", "--rate", "16000", "--model",
               str(model_dir), "--hop", "0.25", "--format", "json"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=tool_env())
    proc.stdin.write(payload[: 2 * 8000])  # exactly one 0.5 s window
    proc.stdin.flush()
    first: list[bytes] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()))
    reader.start()
    reader.join(120)
    assert first and first[0], proc.stderr.read1().decode() if not reader.is_alive() else "no line within 120 s"
    proc.stdin.write(payload[2 * 8000 :])
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in first + rest.splitlines()]
    assert [(w["start_s"], w["end_s"]) for w in lines] == [(0.0, 0.5), (0.25, 0.75), (0.5, 1.0), (0.75, 1.25),
                                                           (0.8, 1.3)]
    assert [w["index"] for w in lines] == [0, 1, 2, 3, 4] and all(w["label"] in LABELS for w in lines)
