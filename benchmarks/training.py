"""Training speed: samples/s of `model.arch` cnn and seed, and the time to 95% validation accuracy on FSDD.

    python benchmarks/training.py [--archs cnn,seed] [--clips 400] [--epochs 2] [--fsdd-target 0.95] [--fsdd FOLDER]

1. Throughput: ``--clips`` generated clips (FSDD-sized, 10 classes) go through the data stages,
   then the train stage runs ``--epochs`` epochs per architecture; samples/s is the stage's own
   figure (reports/train/timing.json: training windows per second of fit, validation excluded).
2. Time to target: FSDD's official split (benchmarks/configs/fsdd_official.yaml), the committed
   train params; training runs in this process with a Keras callback that records the first
   epoch whose val_accuracy >= ``--fsdd-target`` and the wall time since fit began, then stops
   the run (``--no-stop`` trains on). ``--fsdd-target 0`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATA_STAGES = ["ingest", "normalize", "spectrogram", "split"]


def data_stages(root: Path, params: dict[str, Any], env: dict[str, str]) -> Path:
    path = common.write_params(root / "params.yaml", params)
    for stage in DATA_STAGES:
        common.timed(common.stage_cmd(stage, path, root), root, env)
    return path


def throughput(tmp: Path, archs: list[str], clips: int, epochs: int) -> dict[str, Any]:
    source = common.synthetic_clips(tmp / "synthetic-source", clips, seed=1)
    root = tmp / "synthetic"
    env = common.tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    params = common.folders_params(source, train={"epochs": epochs, "warmup_epochs": 0})
    data_stages(root, params, env)
    results = {}
    for arch in archs:
        params["model"]["arch"] = arch
        path = common.write_params(root / f"params-{arch}.yaml", params)
        run = common.timed(common.stage_cmd("train", path, root), root, env)
        timing = json.loads((root / "reports/train/timing.json").read_text())
        results[arch] = {"samples_per_second": timing["samples_per_second"], "train_seconds": timing["train_seconds"],
                         "stage_seconds": run["seconds"], "peak_rss_mib": run["peak_rss_mib"],
                         "parameters": json.loads((root / "metrics/train.json").read_text()).get("parameters")}
        print(f"[training] {arch}: {results[arch]}", file=sys.stderr, flush=True)
    return results


class TargetRecorder:
    """Keras callback factory: the first epoch with val_accuracy >= target, and seconds since fit began."""

    def __init__(self, target: float, stop: bool) -> None:
        import keras

        recorder = self

        class Callback(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                recorder.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                seconds = time.perf_counter() - recorder.started
                accuracy = float((logs or {}).get("val_accuracy", 0.0))
                recorder.epochs.append({"epoch": epoch + 1, "val_accuracy": round(accuracy, 4),
                                        "seconds": round(seconds, 1)})
                if recorder.reached is None and accuracy >= target:
                    recorder.reached = recorder.epochs[-1]
                    if stop:
                        self.model.stop_training = True

        self.callback = Callback()
        self.started = 0.0
        self.epochs: list[dict[str, Any]] = []
        self.reached: dict[str, Any] | None = None


def time_to_target(tmp: Path, fsdd: Path, target: float, stop: bool) -> dict[str, Any]:
    import keras

    root = tmp / "fsdd"
    env = common.tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    start = time.perf_counter()
    path = data_stages(root, common.fsdd_params(fsdd), env)
    data_seconds = time.perf_counter() - start
    recorder = TargetRecorder(target, stop)
    fit = keras.Model.fit

    def fit_with_recorder(model, *args, callbacks=None, **kwargs):
        return fit(model, *args, callbacks=[*(callbacks or []), recorder.callback], **kwargs)

    keras.Model.fit = fit_with_recorder  # the train stage's own fit, plus the recorder
    old_cwd, old_env = Path.cwd(), dict(os.environ)
    try:
        os.chdir(root)
        os.environ.update(env)
        main = runpy.run_path(str(common.REPO / "stages" / "train.py"))["main"]
        main(common.stage_cmd("train", path, root)[2:])
    finally:
        keras.Model.fit = fit
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return {"target": target, "reached": recorder.reached, "epochs": recorder.epochs,
            "data_stages_seconds": round(data_seconds, 1), "stopped_at_target": stop}


def markdown(results: dict[str, Any], command: str) -> list[str]:
    lines = common.header("Training speed", command, results["machine"])
    if results.get("throughput"):
        lines += common.table(["arch", "parameters", "train samples/s", "fit s", "stage s", "peak MiB"], [
            [arch, r["parameters"], f"{r['samples_per_second']:.0f}", f"{r['train_seconds']:.1f}",
             f"{r['stage_seconds']:.1f}", f"{r['peak_rss_mib']:.0f}"] for arch, r in results["throughput"].items()])
        lines += ["", f"{results['clips']} generated clips, {results['epochs']} epoch(s), batch and window from "
                  "params.yaml; samples/s = training windows per second of fit (stage figure).", ""]
    target = results.get("fsdd")
    if target:
        reached = target["reached"]
        lines.append(f"FSDD official split, cnn, committed train params: val_accuracy >= {target['target']} "
                     + (f"first at epoch {reached['epoch']} ({reached['val_accuracy']:.4f}), "
                        f"{reached['seconds']:.0f} s after fit began" if reached else
                        f"**not reached** in {len(target['epochs'])} epochs")
                     + f" (data stages before it: {target['data_stages_seconds']:.0f} s). Per epoch: "
                     + ", ".join(f"{e['epoch']}: {e['val_accuracy']:.3f} @ {e['seconds']:.0f} s"
                                 for e in target["epochs"]) + ".")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=lambda s: [a for a in s.split(",") if a], default=["cnn", "seed"])
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fsdd-target", type=float, default=0.95, help="0 skips the FSDD run")
    parser.add_argument("--fsdd", type=Path, default=common.FSDD, help="FSDD recordings (for --fsdd-target)")
    parser.add_argument("--no-stop", action="store_true", help="train on after reaching the target")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results" / "training")
    args = parser.parse_args(argv)
    command = "python benchmarks/training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    fsdd = common.fsdd_recordings(args.fsdd) if args.fsdd_target > 0 else None
    tmp = Path(tempfile.mkdtemp(prefix="audiocnn-training-", dir=args.workdir))
    results: dict[str, Any] = {"clips": args.clips, "epochs": args.epochs}
    try:
        if args.archs:
            results["throughput"] = throughput(tmp, args.archs, args.clips, args.epochs)
        if args.fsdd_target > 0:
            results["fsdd"] = time_to_target(tmp, fsdd, args.fsdd_target, not args.no_stop)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"] = common.machine()
    common.write_results(args.out, "training", results, markdown(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
