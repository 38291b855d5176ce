"""Prediction speed: warm latency of one 1-second clip, and the command's cold start; a Markdown table.

    python benchmarks/predict.py [--model models] [--tflite export/model.tflite] [--runs 50] [--cold 5]
                                 [--test-warps 0.95,1.0,1.05]

Warm: in one process, the model loaded once, the median over ``--runs`` calls of
``predict.predict_file`` on a 1 s clip (decode, normalize, windows, model) and of the model
call alone. Cold: ``audiocnn predict CLIP --format json`` as a fresh process, spawn to exit
(imports, model load, first result), median of ``--cold`` runs; the .tflite rows use
ai_edge_litert when it is importable (e.g. PYTHONPATH), else tf.lite. Without --model/--tflite an
untrained cnn of the size params.yaml trains (model.width, train.window_seconds) is built and
exported in a temporary folder: speed does not depend on the weights; ``--test-warps`` (default
params.yaml's model.test_warps) wraps it as model.test_warps does (one network pass per factor).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def build_models(root: Path, test_warps: tuple[float, ...] | None = None) -> tuple[Path, Path]:
    """An untrained params.yaml-sized cnn in root/models and its float + int8 TFLite exports in root/export.

    ``test_warps``: the saved model averages over these warps (None: params.yaml's model.test_warps).
    """
    from audiocnn import config, data, fileio, frontend, models, predict, train
    from audiocnn.audio import AudioParams
    from audiocnn.export import to_tflite
    from audiocnn.normalize import NormalizeParams
    from audiocnn.spectrogram import SpectrogramParams

    params = config.read_params(REPO / "params.yaml")
    audio = config.load_section(params, "audio", AudioParams)
    spec = config.load_section(params, "spectrogram", SpectrogramParams)
    window_s = float(params["train"]["window_seconds"])
    frames = data.window_frames(window_s, audio.sample_rate, spec.hop_length, spec.n_fft)
    labels = ["background", "chainsaw", "engine", "storm"]
    norm = np.random.default_rng(0).normal(-40, 12, (8, frames, spec.n_mels)).astype(np.float32)
    model = models.build_cnn(len(labels), (frames, spec.n_mels, 1), params["model"]["width"], 0.3, norm)
    warps = tuple(params["model"].get("test_warps", ())) if test_warps is None else test_warps
    if warps:
        model = models.warp_average(model, warps, "cnn_warped")
    raw_pre = {"audio": config.to_dict(audio), "spectrogram": config.to_dict(spec), "window_seconds": window_s,
               "normalize": config.to_dict(config.load_section(params, "normalize", NormalizeParams)),
               "window_frames": frames, "arch": "cnn"}
    train.write_model_dir(root / "models", model, labels, raw_pre)
    pre = predict.read_preprocess(raw_pre, "benchmark")
    wave, front = frontend.waveform_models(model, pre)
    for name, net in (("waveform", wave), ("frontend", front), ("classifier", model)):
        net.export(str(root / name), format="tf_saved_model", verbose=False)
    calibration = [[front.predict(np.random.default_rng(i).normal(0, 0.1, (1, pre.segment_samples)).astype(np.float32),
                                  verbose=0)] for i in range(16)]
    files = {"model.tflite": to_tflite(root / "waveform"), "frontend.tflite": to_tflite(root / "frontend"),
             "model_int8.tflite": to_tflite(root / "classifier", lambda: iter(calibration))}
    for name, content in files.items():
        (root / "export").mkdir(exist_ok=True)
        (root / "export" / name).write_bytes(content)
    fileio.write_json(root / "export" / "export.json", {
        "labels": labels, "hop_seconds": 0.5, "preprocess": raw_pre,
        "models": {"float": {"file": "model.tflite", "role": "waveform"},
                   "frontend": {"file": "frontend.tflite", "role": "frontend"},
                   "int8": {"file": "model_int8.tflite", "role": "classifier", "frontend": "frontend.tflite"}}})
    return root / "models", root / "export" / "model.tflite"


def warm(model_path: Path, clip: Path, runs: int) -> tuple[float, float]:
    """Median ms of predict_file on ``clip`` and of the model call alone, model loaded once."""
    from audiocnn import predict

    model = predict.load_model(model_path)
    mono = predict.load_waveform(clip, model.pre)
    x, _ = model.clip_inputs(mono, 50)
    for _ in range(3):
        predict.predict_file(model, clip, 0.5)
        model.run(x)
    full, call = [], []
    for _ in range(runs):
        start = time.perf_counter()
        predict.predict_file(model, clip, 0.5)
        full.append(time.perf_counter() - start)
    for _ in range(runs):
        start = time.perf_counter()
        model.run(x)
        call.append(time.perf_counter() - start)
    return 1000 * statistics.median(full), 1000 * statistics.median(call)


def warm_fresh(model_path: Path, clip: Path, runs: int) -> tuple[float, float, str]:
    """``warm`` in a new process: the runtime the command would pick (not the TensorFlow this one loaded)."""
    out = subprocess.run([sys.executable, __file__, "--warm-only", str(model_path), str(clip), str(runs)],
                         check=True, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    full_ms, call_ms, runtime = out.stdout.split()
    return float(full_ms), float(call_ms), runtime


def cold(model_path: Path, clip: Path, runs: int) -> float:
    """Median seconds of `audiocnn predict CLIP` as a new process."""
    command = [str(Path(sys.executable).parent / "audiocnn"), "predict", str(clip), "--model", str(model_path),
               "--format", "json"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def interpreter_name() -> str:
    from audiocnn.tflite import interpreter_class

    return interpreter_class().__module__.split(".")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Keras model dir (default: build an untrained one)")
    parser.add_argument("--tflite", type=Path, help="float .tflite with export.json beside it (default: build)")
    parser.add_argument("--runs", type=int, default=50, help="warm runs (median)")
    parser.add_argument("--cold", type=int, default=5, help="cold-start runs (median)")
    parser.add_argument("--test-warps", type=lambda text: tuple(float(f) for f in text.split(",") if f),
                        help="built model: comma-separated model.test_warps factors ('' = none; default params.yaml's)")
    parser.add_argument("--warm-only", nargs=3, metavar=("MODEL", "CLIP", "RUNS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warm_only:
        full_ms, call_ms = warm(Path(args.warm_only[0]), Path(args.warm_only[1]), int(args.warm_only[2]))
        runtime = "keras" if Path(args.warm_only[0]).is_dir() else interpreter_name()
        print(f"{full_ms:.4f} {call_ms:.4f} {runtime}")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="audiocnn-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.model is None or args.tflite is None:
            built_model, built_tflite = build_models(tmp, args.test_warps)
            args.model, args.tflite = args.model or built_model, args.tflite or built_tflite
        int8 = args.tflite.with_name("model_int8.tflite")
        clip = tmp / "clip.wav"
        t = np.arange(16000) / 16000
        sf.write(clip, (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(0).normal(size=t.size)),
                 16000, subtype="PCM_16")  # 1.0 s, one window
        rows = [("keras", args.model), ("tflite float32", args.tflite)] + ([("tflite int8", int8)] if int8.is_file()
                                                                           else [])
        lines = [f"Prediction speed ({platform.machine()}, {len(os.sched_getaffinity(0))} cores); "
                 "one 1.0 s clip at 16 kHz", "",
                 f"| model | runtime | warm predict_file, ms (median of {args.runs}) | model call only, ms | "
                 f"cold start `audiocnn predict`, s (median of {args.cold}) |", "|---|---|---|---|---|"]
        for name, path in rows:
            full_ms, call_ms, runtime = warm_fresh(path, clip, args.runs)
            print(f"[{name}] warm {full_ms:.2f} ms ({runtime})", file=sys.stderr, flush=True)
            cold_s = cold(path, clip, args.cold)
            lines.append(f"| {name} ({path.name}) | {runtime} | {full_ms:.2f} | {call_ms:.2f} | {cold_s:.2f} |")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow"], check=True, capture_output=True)
        lines += ["", f"`python -c 'import tensorflow'` alone: {time.perf_counter() - start:.2f} s",
                  f"Command: `python benchmarks/predict.py {' '.join(argv if argv is not None else sys.argv[1:])}`"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
