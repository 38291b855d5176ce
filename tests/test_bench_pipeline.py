"""benchmarks/pipeline.py: config checks, source resolution, summaries, and a tiny FSDD run end to end."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FSDD, REPO
from test_speechsynth import fake_espeak, fake_flite  # noqa: F401  (fixtures: stand-in synthesizers on PATH)

sys.path.insert(0, str(REPO / "benchmarks"))
import pipeline  # noqa: E402

CONFIGS = REPO / "benchmarks" / "configs"


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def test_deep_merge_replaces_lists_and_merges_mappings():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged = pipeline.deep_merge(base, {"a": {"c": [3]}, "e": {"f": 2}})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": 1, "e": {"f": 2}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not modified


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_give_valid_params_for_every_run(name):
    """Every run of every config validates with the stages' own dataclasses (no typo reaches a 5-minute run)."""
    from audiocnn import config, evaluate, ingest, models, split, train
    from audiocnn.audio import AudioParams
    from audiocnn.normalize import NormalizeParams
    from audiocnn.spectrogram import SpectrogramParams, check_against_audio

    cfg = pipeline.read_config(CONFIGS / name)
    base = pipeline.base_params(cfg)
    for run in cfg["runs"]:
        params = pipeline.deep_merge(base, run.get("overrides") or {})
        sections = {"audio": AudioParams, "ingest": ingest.IngestParams, "normalize": NormalizeParams,
                    "spectrogram": SpectrogramParams, "split": split.SplitParams, "model": models.ModelParams,
                    "train": train.TrainParams, "evaluate": evaluate.EvaluateParams}
        loaded = {key: config.load_section(params, key, cls) for key, cls in sections.items()}
        check_against_audio(loaded["spectrogram"], loaded["audio"])
        train.input_frames(loaded["train"], loaded["audio"], loaded["spectrogram"])
        if loaded["model"].arch == "seed":
            assert loaded["spectrogram"].images
        source = params["ingest"]["source"]
        assert source == "dataset/demo" if name == "demo.yaml" else Path(source).resolve() == FSDD.resolve()


def test_selection_config_trains_what_the_test_config_trains():
    """fsdd_loso_select.yaml judges settings for fsdd_loso.yaml: both train the same way, all epochs, the
    final one kept, save for the folds and the test's report-only validation (a small share of its training
    clips, where the selection validates on a held-out speaker); an adopted setting missing from either fails here."""
    test, select = (pipeline.read_config(CONFIGS / name) for name in ("fsdd_loso.yaml", "fsdd_loso_select.yaml"))
    assert select["synthetic_speech"] == test["synthetic_speech"]
    test_split = {k: v for k, v in test["overrides"]["split"].items() if k != "val_size"}
    assert {**test["overrides"], "split": test_split} == select["overrides"]
    assert test["overrides"]["split"]["val_size"] <= 0.05
    for config in (test, select):
        assert config["overrides"]["train"]["restore_best"] is False
        assert config["overrides"]["train"]["patience"] >= pipeline.base_params(config)["train"]["epochs"]


def test_read_config_rejects_unknown_keys_and_duplicate_runs(tmp_path):
    with pytest.raises(SystemExit, match="unknown key"):
        pipeline.read_config(write_config(tmp_path / "a.yaml", {"name": "x", "overide": {}}))
    with pytest.raises(SystemExit, match="unique"):
        pipeline.read_config(write_config(tmp_path / "b.yaml", {"name": "x", "runs": [{"name": "r"}, {"name": "r"}]}))
    assert [r["name"] for r in pipeline.read_config(write_config(tmp_path / "c.yaml", {"name": "x"}))["runs"]] == ["x"]
    for bad in ({"voices": 0}, {"takes": 1}, {"voices": 2, "voice": 1}, [1], {"voices": 1, "synthesizer": "sam"},
                [{"voices": 1}, {"takes": 2}]):
        with pytest.raises(SystemExit, match="synthetic_speech needs 'voices'"):
            pipeline.read_config(write_config(tmp_path / "d.yaml", {"name": "x", "synthetic_speech": bad}))
    with pytest.raises(SystemExit, match="groups must differ"):
        pipeline.read_config(write_config(tmp_path / "e.yaml", {"name": "x", "synthetic_speech": [{"voices": 1},
                                                                                                  {"voices": 2}]}))
    specs = pipeline.read_config(write_config(tmp_path / "f.yaml", {"name": "x", "synthetic_speech": [
        {"voices": 3}, {"voices": 2, "synthesizer": "flite"}]}))["synthetic_speech"]
    assert specs == [{**pipeline.SPEECH_DEFAULTS, "voices": 3, "group": "espeak"},
                     {**pipeline.SPEECH_DEFAULTS, "voices": 2, "synthesizer": "flite", "group": "flite"}]


def test_synthetic_speech_goes_into_a_copy_of_the_source(tmp_path, fake_espeak, fake_flite):  # noqa: F811
    """The dataset folder is copied, never written; the spoken words land beside its files, with their own fold."""
    source = tmp_path / "data"
    source.mkdir()
    (source / "3_george_0.wav").write_bytes(b"RIFF not really")
    before = sorted(source.iterdir())
    specs = [{**pipeline.SPEECH_DEFAULTS, "voices": 2, "takes": 2, "group": "tts"},
             {**pipeline.SPEECH_DEFAULTS, "voices": 1, "synthesizer": "flite", "group": "flite"}]
    added = pipeline.source_with_speech(source, tmp_path / "copy", specs, 8000)
    assert added == 50 and sorted(source.iterdir()) == before
    names = {p.name for p in (tmp_path / "copy").iterdir()}
    assert {"3_george_0.wav", "9_tts_3.wav", "9_flite_0.wav"} <= names and len(names) == 51
    pattern = yaml.safe_load((CONFIGS / "fsdd_loso.yaml").read_text())["overrides"]["ingest"]["pattern"]
    assert re.fullmatch(pattern, "9_tts_3.wav").group("fold") == "tts"  # FSDD's pattern reads them
    spec = {**pipeline.SPEECH_DEFAULTS, "voices": 1, "group": "espeak", "words": {"y": "yes"}}
    words = pipeline.source_with_speech(source, tmp_path / "yes", [spec], 16000)
    assert words == 1 and (tmp_path / "yes" / "y_espeak_0.wav").is_file()


def test_summary_and_markdown():
    row = {"accuracy": 0.9, "macro_f1": 0.8, "test_clips": 10, "epochs_run": 3, "val_accuracy": 0.85,
           "kept": "best", "kept_epoch": 2,
           "samples_per_second": 500.0,
           "train_seconds": 60.0, "peak_rss_mib": 900.0, "load_1min": [1.0, 2.0],
           "stages": {"split": {"seconds": 1.0, "ran": True}, "train": {"seconds": 70.0, "ran": False}}}
    exported = {"top1_agreement": 1.0, "mean_abs_diff": 2.6e-6, "int8_accuracy": 0.98}
    runs = {"a": row, "b": {**row, "accuracy": 1.0, "val_accuracy": 0.95, "train_seconds": 100.0,
                            "export": exported}}
    summary = pipeline.summarize(runs)
    assert summary["accuracy_mean"] == pytest.approx(0.95) and summary["accuracy_std"] == pytest.approx(0.05)
    assert summary["val_accuracy_mean"] == pytest.approx(0.9) and summary["kept"] == "best"
    assert pipeline.summarize({"a": row, "b": {**row, "val_accuracy": None}})["val_accuracy_mean"] is None
    assert pipeline.summarize({"a": row, "b": {**row, "kept": "final"}})["kept"] == "best/final"
    assert summary["train_seconds_max"] == 100.0
    results = {"name": "t", "description": "About t.", "runs": runs, "summary": summary, "wall_seconds": 90,
               "machine": {"cores": 2, "cpu": "CPU", "python": "3", "load_average": [1, 1, 1], "date": "today"}}
    text = "\n".join(pipeline.markdown(results, "python benchmarks/pipeline.py t.yaml"))
    assert "| a | 0.9000 | 0.8000 | 10 | 3 | 0.8500 (best 2) | 500 | 60 | 1.0 | 70.0* | - | 900 | 1.0 / 2.0 |" in text
    assert "Mean validation accuracy of the saved models (best epoch) over 2 runs: 0.9000." in text
    warped = {k: {**r, "val_accuracy_without_warps": r["val_accuracy"] - 0.01} for k, r in runs.items()}
    summary = pipeline.summarize(warped)
    assert summary["val_accuracy_without_warps_mean"] == pytest.approx(0.89)
    warped_text = "\n".join(pipeline.markdown({**results, "runs": warped, "summary": summary}, "python t"))
    assert "(best epoch) over 2 runs: 0.9000 (0.8900 without the test-time warps" in warped_text
    assert "| 1.000 / 2.6e-06 / 0.9800 |" in text
    assert "**0.9500** (std 0.0500)" in text and "About t." in text and "`python benchmarks/pipeline.py t.yaml`" in text


@pytest.mark.slow
@pytest.mark.skipif(not FSDD.is_dir(), reason="FSDD recordings not available")
def test_tiny_fsdd_run_end_to_end(tmp_path):
    """40 FSDD clips (2 digits, 2 speakers, index 0-9) copied to tmp_path, the official config's pattern and
    split, shrunk training; a cnn and a seed run in one workspace, their results table and JSON."""
    source = tmp_path / "fsdd"
    source.mkdir()
    for digit in "01":
        for speaker in ("george", "jackson"):
            for index in range(10):
                shutil.copy(FSDD / f"{digit}_{speaker}_{index}.wav", source)
    official = yaml.safe_load((CONFIGS / "fsdd_official.yaml").read_text(encoding="utf-8"))
    shrink = {"ingest": {"source": str(source)}, "normalize": {"workers": 1},
              "spectrogram": {"workers": 1, "image_size": 64, "gallery_per_class": 1},
              "train": {"epochs": 2, "warmup_epochs": 0, "batch_size": 8, "patience": 2},
              "export": {"calibration_windows": 16, "max_int8_accuracy_drop": 1.0}}  # 2 epochs: near-ties
    config = write_config(tmp_path / "tiny.yaml", {
        "name": "tiny", "summary": True, "overrides": pipeline.deep_merge(official["overrides"], shrink),
        "runs": [{"name": "cnn"},
                 {"name": "seed", "overrides": {"model": {"arch": "seed"}, "train": {"restore_best": False}}}]})
    out = tmp_path / "results"
    assert pipeline.main([str(config), "--out", str(out)]) == 0

    results = json.loads((out / "tiny" / "results.json").read_text())
    cnn, seed = results["runs"]["cnn"], results["runs"]["seed"]
    assert cnn["test_clips"] == seed["test_clips"] == 20  # index 0-4 of 2 digits x 2 speakers
    assert "demo" not in cnn["stages"]  # ingest reads FSDD, not the demo set
    assert all(cnn["stages"][s]["ran"] for s in ("ingest", "normalize", "spectrogram", "split", "train", "export"))
    assert "export" not in seed["stages"] and cnn["export"]["top1_agreement"] >= 0.99  # parity on real clips
    assert not seed["stages"]["spectrogram"]["ran"] and seed["stages"]["train"]["ran"]  # only what changed
    assert 0.0 <= cnn["accuracy"] <= 1.0 and cnn["samples_per_second"] > 0 and cnn["peak_rss_mib"] > 100
    assert cnn["kept"] == "best" and seed["kept"] == "final" and seed["kept_epoch"] == 2  # restore_best false
    assert 0.0 <= seed["val_accuracy"] <= 1.0 and results["summary"]["kept"] == "best/final"
    assert results["params"]["seed"]["model"]["arch"] == "seed" and results["summary"]["runs"] == 2
    markdown = (out / "tiny" / "results.md").read_text()
    assert markdown.startswith("### tiny") and "| cnn |" in markdown and "| seed |" in markdown
    assert not list(Path(FSDD).parent.glob("*.dvc"))  # nothing written next to the dataset


def test_seeds_repeat_every_run_once_per_train_seed(tmp_path, monkeypatch):
    """--seeds N,M: runs NAME/seedN and NAME/seedM with train.seed set, the summary over all of them."""
    seen = []

    def fake_run(root, params, env):
        seen.append(params["train"]["seed"])
        return {"accuracy": 0.5 + params["train"]["seed"] / 10, "macro_f1": 0.5, "test_clips": 1, "epochs_run": 1,
                "val_accuracy": 0.6, "kept": "best", "kept_epoch": 1, "samples_per_second": 1.0,
                "train_seconds": 1.0, "peak_rss_mib": 1.0, "load_1min": [0.0, 0.0], "stages": {}}

    monkeypatch.setattr(pipeline, "make_workspace", lambda root, params: root)
    monkeypatch.setattr(pipeline, "run_variant", fake_run)
    config = write_config(tmp_path / "s.yaml", {"name": "s", "summary": True, "overrides": {"ingest": {"source": "/x"}},
                                                "runs": [{"name": "a"}, {"name": "b"}]})
    assert pipeline.main([str(config), "--out", str(tmp_path / "out"), "--seeds", "1,3"]) == 0
    results = json.loads((tmp_path / "out" / "s" / "results.json").read_text())
    assert list(results["runs"]) == ["a/seed1", "a/seed3", "b/seed1", "b/seed3"] and seen == [1, 3, 1, 3]
    assert results["params"]["b/seed3"]["train"]["seed"] == 3
    assert results["summary"]["accuracy_mean"] == pytest.approx(0.7)
    assert results["summary"]["val_accuracy_mean"] == pytest.approx(0.6)
    with pytest.raises(SystemExit, match="--seeds"):
        pipeline.main([str(config), "--out", str(tmp_path / "out"), "--seeds", "1,x"])


def test_runs_read_the_copy_with_synthetic_speech_and_it_is_removed_after(tmp_path, monkeypatch,
                                                                         fake_espeak):  # noqa: F811
    sources = []

    def fake_run(root, params, env):
        source = Path(params["ingest"]["source"])
        sources.append((source, sorted(p.name for p in source.iterdir())))
        return {"accuracy": 0.5, "macro_f1": 0.5, "test_clips": 1, "epochs_run": 1, "val_accuracy": 0.6,
                "kept": "best", "kept_epoch": 1, "samples_per_second": 1.0, "train_seconds": 1.0, "peak_rss_mib": 1.0,
                "load_1min": [0.0, 0.0], "stages": {}}

    monkeypatch.setattr(pipeline, "make_workspace", lambda root, params: root)
    monkeypatch.setattr(pipeline, "run_variant", fake_run)
    data = tmp_path / "data"
    data.mkdir()
    (data / "1_a_0.wav").write_bytes(b"x")
    config = write_config(tmp_path / "v.yaml", {"name": "v", "synthetic_speech": {"voices": 2, "words": {"1": "one"}},
                                                "overrides": {"ingest": {"source": str(data)}}})
    assert pipeline.main([str(config), "--out", str(tmp_path / "out")]) == 0
    (source, names), = sources
    assert source != data and names == ["1_a_0.wav", "1_espeak_0.wav", "1_espeak_1.wav"] and not source.exists()
    results = json.loads((tmp_path / "out" / "v" / "results.json").read_text())
    assert results["synthetic_speech"]["clips"] == 2 and results["synthetic_speech"]["source"] == str(data)
    assert f"Training data: 2 synthetic clips (`audiocnn speak`: 2 espeak voices x 1 take(s), seed 0, fold " \
           f"`espeak`) added to a copy of {data}." in (tmp_path / "out" / "v" / "results.md").read_text()
    assert sorted(p.name for p in data.iterdir()) == ["1_a_0.wav"]


def test_a_failed_export_gate_is_reported_and_the_run_kept(tmp_path, monkeypatch):
    """export's parity gate failing (int8 too far below float) is a result, not a crash; other failures raise."""
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"accuracy": 0.9, "macro_f1": 0.9, "clips": 500}))
    (tmp_path / "metrics" / "train.json").write_text(json.dumps({"epochs_run": 3}))
    gate = ("12:00:00 ERROR audiocnn.stage: export parity not met on 500 test clips: int8 accuracy 0.8880 is "
            "0.0140 below float 0.9020 > export.max_int8_accuracy_drop 0.01\nERROR: failed to reproduce 'export'")
    failing = {"export"}

    def fake_stage(root, stage, env):
        if stage in failing:
            raise RuntimeError(f"dvc repro --single-item {stage} failed (255) in {root}:\n{gate}")
        return {"seconds": 1.0, "peak_rss_mib": 10.0, "cpu_seconds": 1.0, "ran": True}

    monkeypatch.setattr(pipeline, "timed_stage", fake_stage)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["ingest"]["source"] = "/data"
    result = pipeline.run_variant(tmp_path, params, {})
    assert result["accuracy"] == 0.9 and "export" not in result["stages"] and "train" in result["stages"]
    assert result["export"]["failed"].startswith("export parity not met on 500 test clips: int8 accuracy 0.8880")
    assert pipeline.export_cell(result["export"]).startswith("failed: export parity not met")
    failing = {"train"}
    with pytest.raises(RuntimeError, match="train failed"):
        pipeline.run_variant(tmp_path, params, {})
