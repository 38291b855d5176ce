"""Smoke tests of the benchmark runners (benchmarks/*.py): tiny inputs, they run and write their tables.

Not timed tests: nothing here asserts a speed. The full DVC (overhead) and training runs take
minutes (TensorFlow, several `dvc repro`) and are marked slow; their cheap parts run here.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from audiocnn import packed

from conftest import FSDD

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def bench(name: str):
    return importlib.import_module(name)


def test_features_runner_writes_its_table(tmp_path):
    features = bench("features")
    out = tmp_path / "out"
    assert features.main(["--fsdd", "", "--synthetic", "20", "--seed-clips", "2", "--plain-clips", "4",
                          "--repeats", "2", "--workers", "1,2", "--ceiling-seconds", "0.05", "--workdir", str(tmp_path),
                          "--set", "spectrogram.images=false", "--warm-memory", "0.01", "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "Memory warmed first: 0.01 GB touched in " in text
    assert "| synthetic 20 | 20 | ours, 1 worker(s) |" in text and "seed notebook" in text and "Scaling on" in text
    assert "per repeat (runs side by side)" in text and "Machine ceiling on synthetic 20" in text
    assert "CPU on synthetic 20, user / system (kernel) seconds" in text and "2 worker(s) normalize " in text
    assert "params set: spectrogram.images=false;" in text
    assert "Start-bound on synthetic 20: starting the stages" in text and "could be at most " in text
    data = json.loads((out / "results.json").read_text())
    assert data["datasets"]["synthetic 20"]["ours"]["2"]["clips_per_second"]["both"] > 0
    ceiling = data["datasets"]["synthetic 20"]["ceiling"]
    assert ceiling["processes"] == 2 and len(ceiling["per_repeat"]) == 2 and 0 < ceiling["median"] <= 2.5
    start = data["datasets"]["synthetic 20"]["start"]
    assert set(start) == {"normalize", "spectrogram"} and all(len(s["runs"]) == 2 for s in start.values())
    assert all(s["seconds"] > 0 for s in start.values())
    assert data["machine"]["cores"] >= 1 and list(tmp_path.iterdir()) == [out]  # temp folder removed


def test_start_bound_is_amdahls_law():
    features = bench("features")
    assert features.start_bound(1.0, 0.0, 2.0) == 2.0  # nothing fixed: the ceiling
    assert features.start_bound(1.0, 1.0, 2.0) == 1.0  # all fixed: no gain
    assert features.start_bound(1.0, 0.25, 1.9) == pytest.approx(1 / (0.25 + 0.75 / 1.9))
    assert features.start_bound(0.2, 0.3, 2.0) == 1.0  # a start timed above the run (noise): no gain


def test_generated_sets_of_another_shape_and_front_end(tmp_path):
    """--synthetic-shape / --front-end params: demo-sized clips through params.yaml's front end, named as such."""
    features, common = bench("features"), bench("common")
    assert common.clip_shape("1.5,4,22050") == (1.5, 4.0, 22050)
    for bad in ("1,2", "2,1,8000", "0,1,8000", "1,2,100", "a,b,c"):
        with pytest.raises(SystemExit, match="--synthetic-shape"):
            common.clip_shape(bad)
    assert common.synthetic_name(5) == "synthetic 5"
    assert common.synthetic_name(5, (1.5, 4.0, 22050)) == "synthetic 5 (1.5-4 s at 22050 Hz)"
    params = common.folders_params(tmp_path, "params")
    repo = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["spectrogram"] == repo["spectrogram"] and params["audio"] == repo["audio"]
    assert common.folders_params(tmp_path)["audio"]["sample_rate"] == 8000  # FSDD's front end by default
    out = tmp_path / "out"
    assert features.main(["--fsdd", "", "--synthetic", "6", "--synthetic-shape", "1.0,1.5,16000", "--front-end",
                          "params", "--seed-clips", "1", "--plain-clips", "2", "--repeats", "1", "--workers", "1",
                          "--ceiling-seconds", "0", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert list(data["datasets"]) == ["synthetic 6 (1-1.5 s at 16000 Hz)"]
    assert "| synthetic 6 (1-1.5 s at 16000 Hz) | 6 | ours, 1 worker(s) |" in (out / "results.md").read_text()


def test_memory_runner_writes_its_table(tmp_path):
    memory = bench("memory")
    out = tmp_path / "out"
    assert memory.main(["--sizes", "40,50", "--seconds", "0.5,1", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    for stage in ("ingest", "normalize", "spectrogram", "split"):
        assert f"| {stage} |" in text
    assert "generated clips of 0.5-1 s" in text
    data = json.loads((out / "results.json").read_text())
    assert 10 < data["sizes"]["50"]["spectrogram"]["peak_rss_mib"] < 2000


def test_overhead_stages_alone_and_table(tmp_path):
    overhead, common = bench("overhead"), bench("common")
    source = common.synthetic_clips(tmp_path / "src", 12, classes=2)
    files = sorted(source.rglob("*.wav"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in files:
        overhead.link(path, flat / path.name)
    params = common.folders_params(flat)
    params["ingest"]["layout"] = "pattern"
    params["ingest"]["pattern"] = r"(?P<label>class\d+)_\d+\.wav"
    alone = overhead.stages_alone(tmp_path, flat, sorted(flat.glob("*.wav")), sorted(flat.glob("*.wav"))[:2], params,
                                  repeats=2)
    assert set(alone) == {"full", "added", "added_runs"} and alone["added"]["spectrogram"]["seconds"] > 0
    assert [len(runs) for runs in alone["added_runs"].values()] == [2, 2, 2]
    features = packed.Packed(tmp_path / "alone" / "dataset" / "features")  # the last repeat's: linked + new file
    assert [path.name for path in features.paths] == ["features.npy", "features.1.npy"]
    assert any((tmp_path / "alone-cache" / "spectrogram").rglob("*.npy"))  # the cache was used
    stage = {"seconds": 1.0, "peak_rss_mib": 1.0, "ran": True}
    results = {"full": {"spectrogram": stage}, "added": {"clips": 2, "stages": {"spectrogram": dict(stage, seconds=0.05)}},
               "noop": {"runs": [{"seconds": 0.9, "ran": []}], "median_s": 0.9},
               "exp_run": {"seconds": 9.0, "ran": ["train", "evaluate"]}, "alone": alone, "clips": 12,
               "machine": common.machine()}
    text = "\n".join(overhead.markdown(results, "python benchmarks/overhead.py"))
    assert "no-op `dvc repro`: median 0.90 s" in text and "5.0% of its full-run time" in text
    assert "spectrogram alone after +1% clips:" in text


@pytest.mark.parametrize("runner, args", [("features", []), ("overhead", ["--clips", "60"]), ("training", [])])
def test_runners_name_a_missing_fsdd_folder_before_any_work(tmp_path, runner, args):
    """A checkout outside the default layout does not find FSDD: the runner stops, naming the folder."""
    empty = tmp_path / "recordings"
    empty.mkdir()
    (empty / "readme.txt").write_text("no audio here")
    for missing in (empty, tmp_path / "nowhere"):
        with pytest.raises(SystemExit, match=f"FSDD recordings not found: {missing}"):
            bench(runner).main([*args, "--fsdd", str(missing), "--workdir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert [p.name for p in tmp_path.iterdir()] == ["recordings"]  # no temp folder, no results


def test_set_params_applies_dotted_overrides_and_names_a_wrong_key():
    common = bench("common")
    params = {"spectrogram": {"images": True, "n_mels": 40}, "train": {"augment": {"gain_db": 6.0}}}
    common.set_params(params, ["spectrogram.images=false", "train.augment.gain_db=0"])
    assert params == {"spectrogram": {"images": False, "n_mels": 40}, "train": {"augment": {"gain_db": 0}}}
    for wrong in ("spectrogram.image=false", "nope.images=1", "spectrogram.images"):
        with pytest.raises(SystemExit, match=wrong.replace(".", "\\.")):
            common.set_params(params, [wrong])


def test_training_table_and_target_recorder(tmp_path):
    training, common = bench("training"), bench("common")
    recorder = training.TargetRecorder(0.95, stop=True)

    class Model:
        stop_training = False

    recorder.callback.set_model(Model())
    recorder.callback.on_train_begin()
    for epoch, accuracy in enumerate([0.5, 0.96, 0.97]):
        recorder.callback.on_epoch_end(epoch, {"val_accuracy": accuracy})
    assert recorder.reached["epoch"] == 2 and recorder.callback.model.stop_training
    results = {"clips": 10, "epochs": 1, "machine": common.machine(),
               "throughput": {"cnn": {"samples_per_second": 100.0, "train_seconds": 1.0, "stage_seconds": 2.0,
                                      "peak_rss_mib": 900.0, "parameters": 5}},
               "fsdd": {"target": 0.95, "reached": recorder.reached, "epochs": recorder.epochs,
                        "data_stages_seconds": 3.0, "stopped_at_target": True}}
    text = "\n".join(training.markdown(results, "python benchmarks/training.py"))
    assert "| cnn | 5 | 100 |" in text and "first at epoch 2" in text


@pytest.mark.slow
@pytest.mark.parametrize("data", [["--clips", "60"], ["--synthetic", "60"]], ids=["fsdd", "synthetic"])
def test_overhead_runner_end_to_end(tmp_path, data):
    if data[0] == "--clips" and not FSDD.is_dir():
        pytest.skip(f"FSDD not found at {FSDD} (the overhead runner reads it)")
    assert bench("overhead").main([*data, "--noop-runs", "1", "--workdir", str(tmp_path), "--set",
                                   "spectrogram.images=false", "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "results.md").read_text()
    assert "no-op `dvc repro`" in text and "+1 clips s" in text  # 60 clips: 59 first, then 1 more
    assert ("generated" in text) == (data[0] == "--synthetic")


@pytest.mark.slow
def test_training_runner_end_to_end(tmp_path):
    assert bench("training").main(["--archs", "cnn", "--clips", "30", "--epochs", "1", "--fsdd-target", "0",
                                   "--workdir", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "| cnn |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_predict_runner_writes_its_table(capsys):
    """benchmarks/predict.py (smoke): builds the untrained cnn with test-time warps, exports it, times each runtime."""
    predict_bench = bench("predict")
    assert predict_bench.main(["--runs", "2", "--cold", "1", "--test-warps", "0.95,1.0,1.05"]) == 0
    table = capsys.readouterr().out
    assert "| keras (models) |" in table and "| tflite float32 (model.tflite) |" in table
    assert "| tflite int8 (model_int8.tflite) |" in table and "--test-warps 0.95,1.0,1.05" in table
