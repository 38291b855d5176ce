"""Exported .tflite models at prediction time: the interpreter, int8 (de)quantization, export.json.

The interpreter is LiteRT's (``ai_edge_litert``, a small package with a fast import) when it
is installed, else ``tf.lite.Interpreter`` (which imports all of TensorFlow). A model is found
through the ``export.json`` written beside it: its labels, the training preprocessing, the
hop, and for the int8 classifier the float front end that feeds it.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np

from audiocnn import fileio
from audiocnn.predict import Model, ModelError, read_preprocess, waveform_segment, waveform_windows


def interpreter_class() -> type:
    """LiteRT's Interpreter (ai_edge_litert: imports in ~0.1 s) when installed, else tf.lite's (imports TensorFlow).

    tf.lite's when TensorFlow is already loaded (export, tests): it costs nothing more then,
    and one process does not carry two TFLite runtimes.
    """
    if "tensorflow" not in sys.modules:
        try:
            from ai_edge_litert.interpreter import Interpreter

            return Interpreter
        except ImportError:
            pass
    import tensorflow as tf

    return tf.lite.Interpreter


class TFLiteRunner:
    """One .tflite model, invoked one example at a time; int8 inputs/outputs are (de)quantized here."""

    def __init__(self, model: Path | bytes, threads: int | None = None) -> None:
        threads = threads or min(4, len(os.sched_getaffinity(0)))
        source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite's deprecation notice on every construction
            self.interpreter = interpreter_class()(**source, num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n, *input shape without batch) float32 -> (n, *output shape without batch) float32."""
        out = []
        for example in x:
            example = example[np.newaxis].astype(np.float32, copy=False)
            if self.input["dtype"] == np.int8:
                scale, zero = self.input["quantization"]
                example = np.clip(np.round(example / scale + zero), -128, 127).astype(np.int8)
            self.interpreter.set_tensor(self.input["index"], example)
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.output["index"])
            if self.output["dtype"] == np.int8:
                scale, zero = self.output["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            out.append(y[0])
        return np.stack(out)


class TFLiteModel(Model):
    """An exported .tflite with export.json beside it; waveform windows in (int8: float front end first)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        meta_path = path.parent / "export.json"
        if not path.is_file():
            raise ModelError(f"model not found: {path}")
        if not meta_path.is_file():
            raise ModelError(f"{meta_path} not found: a .tflite needs the export.json written beside it")
        meta = fileio.read_json(meta_path)
        entry = next((m for m in meta.get("models", {}).values() if m.get("file") == path.name), None)
        if entry is None or entry.get("role") == "frontend":
            raise ModelError(f"{path}: not a classifier listed in {meta_path}")
        try:
            self.labels, self.hop_seconds = list(meta["labels"]), meta.get("hop_seconds")
            self.pre = read_preprocess(meta["preprocess"], meta_path)
        except (KeyError, TypeError) as err:
            raise ModelError(f"{meta_path}: incomplete, no {err}") from None
        self.stages = [TFLiteRunner(path.parent / entry["frontend"])] if entry.get("frontend") else []
        self.stages.append(TFLiteRunner(path))

    def clip_inputs(self, mono: np.ndarray, hop_frames: int) -> tuple[np.ndarray, list[int]]:
        return waveform_windows(mono, self.pre, hop_frames)

    def window_input(self, mono: np.ndarray) -> np.ndarray:
        return waveform_segment(mono[: self.pre.window_samples], 0, self.pre)[np.newaxis]  # a clip of its own

    def run(self, x: np.ndarray) -> np.ndarray:
        for stage in self.stages:
            x = stage(x)
        return x
