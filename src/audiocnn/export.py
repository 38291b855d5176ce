"""Stage export: models/model.keras -> waveform-input models for devices, with measured parity.

Writes to the output folder:
- ``saved_model/``: a TF SavedModel (signature ``serve``) from the normalized mono waveform
  window with the samples around it that its frames overlap, (batch, segment_samples) float32 at
  audio.sample_rate, to class probabilities, with the log-mel front end inside
  (``audiocnn.frontend``): no librosa on the device. Loudness
  normalization (DC removal, rms/peak gain over the whole recording) stays outside the
  model: it sees the whole recording, a window does not.
- ``model.tflite``: the same, float32.
- ``model_int8.tflite`` + ``frontend.tflite``: full-integer (int8 in, int8 out) classifier on
  the log-mel window, calibrated on training windows, behind the float32 front end. A fully
  int8 waveform model converts, but 8 bits cannot hold a power spectrum's 80+ dB range: its
  accuracy collapses (0.36 vs 0.75 on a demo-set model we measured), so the front end stays float.
- ``export.json``: file sizes, input spec, labels, preprocessing, hop, and parity on the test
  split. The stage fails (DataError with the figures) when parity misses ``export`` params.

Rerun on the same model, every file is byte-identical (``save_saved_model``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from audiocnn import data, fileio, normalize, packed, predict, timeline
from audiocnn.config import check
from audiocnn.errors import DataError
from audiocnn.frontend import waveform_models
from audiocnn.tflite import TFLiteRunner

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportParams:
    """``export``: int8 calibration and the parity the exported models must reach."""

    int8: bool  # also write the int8 classifier (and its float front end)
    calibration_windows: int  # random training windows in the int8 representative dataset
    min_top1_agreement: float  # float model vs evaluate's prediction, fraction of test clips
    max_mean_abs_diff: float  # float model vs evaluate's probabilities, mean over clips and classes
    max_int8_accuracy_drop: float  # float model accuracy - int8 accuracy (fraction, 0.01 = 1 point)
    seed: int  # picks the calibration windows

    def __post_init__(self) -> None:
        check(self.calibration_windows >= 1, "calibration_windows", self.calibration_windows, "must be >= 1")
        check(0.0 <= self.min_top1_agreement <= 1.0, "min_top1_agreement", self.min_top1_agreement, "must be in 0..1")
        check(self.max_mean_abs_diff >= 0, "max_mean_abs_diff", self.max_mean_abs_diff, "must be >= 0")
        check(0.0 <= self.max_int8_accuracy_drop <= 1.0, "max_int8_accuracy_drop", self.max_int8_accuracy_drop,
              "must be in 0..1")
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")


def save_saved_model(model: "keras.Model", path: Path, input_samples: int) -> None:
    """Write ``model`` as a SavedModel (signature ``serve``: ``waveform`` -> ``output_0``), byte-reproducible.

    Not ``model.export``: Keras tracks the layers in an order that varies between processes, so
    the variables (same values) were written in a varying order. Here the variables are tracked
    in the order of their paths, and the fingerprint's random uuid is replaced by one derived
    from its content hashes: the same model gives the same bytes.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import fingerprint_pb2

    module = tf.Module()
    module.weights = [w.value for w in sorted(model.weights, key=lambda w: w.path)]  # the tf.Variables

    @tf.function(input_signature=[tf.TensorSpec([None, input_samples], tf.float32, name="waveform")])
    def serve(waveform: tf.Tensor) -> tf.Tensor:
        return model(waveform, training=False)

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serve": serve})
    fingerprint_path = path / "fingerprint.pb"
    if fingerprint_path.is_file():
        fingerprint = fingerprint_pb2.FingerprintDef.FromString(fingerprint_path.read_bytes())
        digest = hashlib.sha256(f"{fingerprint.saved_model_checksum}:{fingerprint.checkpoint_hash}".encode())
        fingerprint.uuid = str(int(digest.hexdigest()[:32], 16))
        fingerprint_path.write_bytes(fingerprint.SerializeToString(deterministic=True))


def to_tflite(saved_model: Path, representative: Callable[[], Iterator[list[np.ndarray]]] | None = None) -> bytes:
    """Convert a SavedModel: float32, or full-integer int8 (int8 in/out) calibrated on ``representative``."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if representative is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


def calibration_set(clips: packed.Packed, ids: list[str], pre: predict.Preprocess, frontend: "keras.Model",
                    count: int, seed: int) -> list[np.ndarray]:
    """``count`` random training windows as the int8 classifier sees them: (1, frames, n_mels, 1) dB each.

    ``clips``: normalize's packed clips; ``ids``: the training clips, used in turn.
    """
    rng = np.random.default_rng(seed)
    windows = []
    for i in range(count):
        mono = normalize.read_clip(clips, ids[i % len(ids)])
        start = int(rng.integers(0, max(1, len(mono) - pre.window_samples + 1)))
        windows.append(predict.waveform_segment(mono, start, pre))
    logmel = np.asarray(frontend.predict(np.stack(windows), batch_size=64, verbose=0), dtype=np.float32)
    return [x[np.newaxis] for x in logmel]


def reference_probabilities(model: "keras.Model", ids: list[str], features: Path, pre: predict.Preprocess,
                            hop: int, batch_size: int) -> np.ndarray:
    """Evaluate's clip probabilities (n_clips, classes): Keras on the pipeline's feature windows."""
    from audiocnn import evaluate, models

    inputs = (models.model_input("cnn", {"id": i, "image": ""}, features_dir=features, images_dir="",
                                 window_frames=pre.window_frames, hop_frames=hop, top_db=pre.spectrogram.top_db)
              for i in ids)
    return evaluate.clip_probabilities(inputs, lambda x: model.predict(x, batch_size=batch_size, verbose=0),
                                       chunk=batch_size * 16)


def clip_means(run: Callable[[np.ndarray], np.ndarray], clips: list[np.ndarray], pre: predict.Preprocess,
               hop: int) -> np.ndarray:
    """(n_clips, classes) float64: ``run`` on each clip's waveform windows, averaged as evaluate averages."""
    return np.stack([np.asarray(run(predict.waveform_windows(c, pre, hop)[0]), np.float64).mean(axis=0)
                     for c in clips])


def parity(reference: np.ndarray, floats: np.ndarray, int8: np.ndarray | None, y: np.ndarray) -> dict[str, Any]:
    """The figures export.json reports: agreement and probability gaps vs evaluate, accuracies."""
    gap = np.abs(floats - reference)
    figures: dict[str, Any] = {
        "clips": int(len(y)), "reference_accuracy": round(float((reference.argmax(1) == y).mean()), 6),
        "float": {"top1_agreement": round(float((floats.argmax(1) == reference.argmax(1)).mean()), 6),
                  "mean_abs_diff": float(gap.mean()), "max_abs_diff": float(gap.max()),
                  "accuracy": round(float((floats.argmax(1) == y).mean()), 6)},
    }
    if int8 is not None:
        accuracy = float((int8.argmax(1) == y).mean())
        figures["int8"] = {"accuracy": round(accuracy, 6),
                           "accuracy_drop": round(figures["float"]["accuracy"] - accuracy, 6) + 0.0,  # no -0.0
                           "top1_agreement_with_float": round(float((int8.argmax(1) == floats.argmax(1)).mean()), 6),
                           "mean_abs_diff_vs_float": float(np.abs(int8 - floats).mean())}
    return figures


def check_parity(figures: dict[str, Any], params: ExportParams) -> None:
    """DataError naming every figure that misses its ``export`` threshold."""
    f = figures["float"]
    failures = []
    if f["top1_agreement"] < params.min_top1_agreement:
        failures.append(f"float top-1 agreement {f['top1_agreement']:.4f} < export.min_top1_agreement "
                        f"{params.min_top1_agreement}")
    if f["mean_abs_diff"] > params.max_mean_abs_diff:
        failures.append(f"float mean |p - p_evaluate| {f['mean_abs_diff']:.2e} > export.max_mean_abs_diff "
                        f"{params.max_mean_abs_diff}")
    if "int8" in figures and figures["int8"]["accuracy_drop"] > params.max_int8_accuracy_drop:
        failures.append(f"int8 accuracy {figures['int8']['accuracy']:.4f} is {figures['int8']['accuracy_drop']:.4f} "
                        f"below float {f['accuracy']:.4f} > export.max_int8_accuracy_drop "
                        f"{params.max_int8_accuracy_drop}")
    if failures:
        raise DataError(f"export parity not met on {figures['clips']} test clips: " + "; ".join(failures))


def tensor_spec(runner: TFLiteRunner, which: str) -> dict[str, Any]:
    """export.json's description of a model's input or output tensor (with int8 scale and zero point)."""
    detail = runner.input if which == "input" else runner.output
    spec = {"name": detail["name"], "dtype": np.dtype(detail["dtype"]).name, "shape": detail["shape"].tolist()}
    if detail["dtype"] == np.int8:
        spec["scale"], spec["zero_point"] = float(detail["quantization"][0]), int(detail["quantization"][1])
    return spec


def write_bytes(path: Path, content: bytes) -> None:
    """Write ``content`` atomically."""
    with fileio.atomic_path(path) as tmp:
        tmp.write_bytes(content)


def replace_dir(src: Path, dest: Path) -> None:
    """Copy the folder ``src`` to ``dest`` (replacing it) through a temporary sibling."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except OSError as err:
        raise fileio.OutputError(f"cannot write {dest}: {err.strerror or err}") from err


def frontend_max_db(runner: TFLiteRunner, clips: list[np.ndarray], pre: predict.Preprocess) -> float:
    """Max |front end - spectrogram.log_mel| in dB over the first window of each clip (as a clip of its own)."""
    from audiocnn.spectrogram import log_mel

    c = pre.context_samples
    segments = np.stack([predict.waveform_segment(clip[: pre.window_samples], 0, pre) for clip in clips])
    ours = runner(segments)[..., 0]  # (n, frames, n_mels) dB
    return float(max(np.abs(o - log_mel(s[c : c + pre.window_samples], pre.sample_rate, pre.spectrogram)).max()
                     for o, s in zip(ours, segments)))


def run(*, model_dir: Path, normalized: Path, split: Path, features: Path, out: Path, params: ExportParams,
        hop_seconds: float, batch_size: int, metrics: Path | None = None) -> dict[str, Any]:
    """Export models/ to ``out`` (SavedModel, TFLite float32/int8, export.json) if parity holds; return export.json.

    ``metrics`` (optional): the parity figures and file sizes again, for ``dvc metrics``.
    """
    from audiocnn import evaluate

    preprocess_path = model_dir / "preprocess.json"
    if not preprocess_path.is_file():
        raise DataError(f"{preprocess_path} not found: run the train stage first")
    raw_pre = fileio.read_json(preprocess_path)
    pre = predict.read_preprocess(raw_pre, preprocess_path)
    if pre.arch != "cnn":
        raise DataError(f"{preprocess_path}: arch {pre.arch!r}: export supports model.arch cnn (log-mel input)")
    sp = pre.spectrogram
    if data.window_frames(pre.window_seconds, pre.sample_rate, sp.hop_length, sp.n_fft) != pre.window_frames:
        raise DataError(f"{preprocess_path}: {pre.window_samples} samples do not give window_frames="
                        f"{pre.window_frames} (a model from an older version: rerun train)")
    classifier, labels = evaluate.load_model(model_dir)
    test, train = data.read_split(split, "test"), data.read_split(split, "train")
    y = data.label_indices(test, labels, str(split / "test.csv"))
    clips = normalize.open_clips(normalized)
    missing = [i for i in list(test["id"]) + list(train["id"]) if i not in clips.refs]
    if missing:
        raise DataError(f"{len(missing)} clip(s) of {split} not in {clips.folder / packed.INDEX_NAME}, "
                        f"first: {missing[0]}")
    hop = timeline.hop_frames(hop_seconds, pre.sample_rate, pre.spectrogram.hop_length)
    wave_model, frontend = waveform_models(classifier, pre)

    with tempfile.TemporaryDirectory(prefix="audiocnn-export-") as tmp_name:
        tmp = Path(tmp_name)
        save_saved_model(wave_model, tmp / "saved_model", pre.segment_samples)
        frontend.export(str(tmp / "frontend"), format="tf_saved_model", verbose=False)
        files = {"model.tflite": to_tflite(tmp / "saved_model"), "frontend.tflite": to_tflite(tmp / "frontend")}
        runners = {name: TFLiteRunner(content) for name, content in files.items()}
        if params.int8:
            calibration = calibration_set(clips, list(train["id"]), pre, frontend, params.calibration_windows,
                                          params.seed)
            classifier.export(str(tmp / "classifier"), format="tf_saved_model", verbose=False)
            files["model_int8.tflite"] = to_tflite(tmp / "classifier", lambda: ([x] for x in calibration))
            runners["model_int8.tflite"] = TFLiteRunner(files["model_int8.tflite"])
        log.info("converted: %s", ", ".join(f"{name} {len(content) / 1e6:.2f} MB" for name, content in files.items()))

        reference = reference_probabilities(classifier, list(test["id"]), features, pre, hop, batch_size)
        test_clips = [normalize.read_clip(clips, i) for i in test["id"]]
        floats = clip_means(runners["model.tflite"], test_clips, pre, hop)
        int8 = None
        if params.int8:
            int8 = clip_means(lambda x: runners["model_int8.tflite"](runners["frontend.tflite"](x)), test_clips, pre,
                              hop)
        figures = parity(reference, floats, int8, y)
        figures["frontend_max_abs_db"] = frontend_max_db(runners["frontend.tflite"], test_clips[:16], pre)
        log.info("parity: %s", figures)
        check_parity(figures, params)

        out.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            write_bytes(out / name, content)
        replace_dir(tmp / "saved_model", out / "saved_model")

    saved_bytes = sum(p.stat().st_size for p in (out / "saved_model").rglob("*") if p.is_file())
    wave_in = tensor_spec(runners["model.tflite"], "input") | {"sample_rate": pre.sample_rate}
    models = {
        "float": {"file": "model.tflite", "role": "waveform", "bytes": len(files["model.tflite"]), "input": wave_in,
                  "output": tensor_spec(runners["model.tflite"], "output")},
        "frontend": {"file": "frontend.tflite", "role": "frontend", "bytes": len(files["frontend.tflite"]),
                     "input": wave_in, "output": tensor_spec(runners["frontend.tflite"], "output")},
        "saved_model": {"dir": "saved_model", "role": "waveform", "signature": "serve", "bytes": saved_bytes,
                        "input": {"dtype": "float32", "shape": [None, pre.segment_samples],
                                  "sample_rate": pre.sample_rate}},
    }
    if params.int8:
        runner = runners["model_int8.tflite"]
        models["int8"] = {"file": "model_int8.tflite", "role": "classifier", "frontend": "frontend.tflite",
                          "bytes": len(files["model_int8.tflite"]), "input": tensor_spec(runner, "input"),
                          "output": tensor_spec(runner, "output")}
    meta = {
        "labels": labels, "sample_rate": pre.sample_rate, "window_seconds": pre.window_seconds,
        "window_samples": pre.window_samples, "window_frames": pre.window_frames, "hop_seconds": hop_seconds,
        "context_samples": pre.context_samples, "segment_samples": pre.segment_samples,
        "input": {"dtype": "float32", "shape": [None, pre.segment_samples], "sample_rate": pre.sample_rate,
                  "content": "mono waveform, DC removed and loudness-normalized over the whole recording "
                             "(preprocess.normalize) before windowing: samples [start - context_samples, "
                             "start - context_samples + segment_samples) of the recording, zeros outside it; "
                             "the log-mel front end is inside the model"},
        "preprocess": raw_pre, "models": models, "parity": figures,
        "thresholds": {"min_top1_agreement": params.min_top1_agreement, "max_mean_abs_diff": params.max_mean_abs_diff,
                       "max_int8_accuracy_drop": params.max_int8_accuracy_drop},
    }
    fileio.write_json(out / "export.json", meta)
    if metrics is not None:
        fileio.write_json(metrics, {**figures, "bytes": {key: entry["bytes"] for key, entry in models.items()}})
    log.info("exported %s to %s: float agreement %.4f, mean |dp| %.2e%s", model_dir, out,
             figures["float"]["top1_agreement"], figures["float"]["mean_abs_diff"],
             f", int8 accuracy {figures['int8']['accuracy']:.4f} (float {figures['float']['accuracy']:.4f})"
             if int8 is not None else "")
    return meta
