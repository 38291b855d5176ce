"""Run the DVC pipeline for dataset configs in a temporary workspace and tabulate the results.

    python benchmarks/pipeline.py CONFIG [CONFIG ...] [--runs NAME,...] [--seeds N,...] [--out DIR] [--keep]

A config (benchmarks/configs/*.yaml) names a benchmark and deep-merges ``overrides`` into the
repo's params.yaml; its optional ``runs`` are variants (each with its own ``overrides``, e.g. the
folds of leave-one-speaker-out, or another architecture) run one after another in the same
workspace, so DVC recomputes only the stages a variant changes; ``summary: true`` adds the mean
and standard deviation of the runs' test metrics (cross-validation folds) and the mean validation
accuracy of the saved models (of the best epoch, or of the final one with train.restore_best false). ``--seeds`` repeats every run once per ``train.seed`` (runs ``NAME/seedN``):
on a few speakers one seed's validation accuracy moves by several points, so settings are
compared on the mean over seeds. ``synthetic_speech: {voices: N, synthesizer: espeak, ...}`` (or
a list of such, one per synthesizer) adds spoken words from N synthetic voices (``audiocnn speak``)
to a temporary copy of the source, in a fold of their own (the synthesizer's name) for the
training side of the split: no run names it as a test fold. A relative
``ingest.source`` is resolved against the repo root unless a pipeline stage makes it (the demo
set); the demo stage runs only when ingest reads its output. Each stage runs as its own
``dvc repro --single-item``, timed, with its peak resident memory from wait4(). The workspace is
a fresh git repo in a temporary directory with its own MLflow store: nothing is written into the
dataset or into this repository, except the results, ``<out>/<config name>/results.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py: machine facts, timed subprocesses, tables)

REPO = Path(__file__).resolve().parents[1]
STAGES = ["demo", "ingest", "normalize", "spectrogram", "split", "train", "evaluate", "export"]
PIPELINE_FILES = ["dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvcignore", ".gitignore"]
CONFIG_KEYS = {"name", "description", "overrides", "runs", "summary", "synthetic_speech"}
RUN_KEYS = {"name", "overrides"}
SPEECH_KEYS = {"words", "voices", "takes", "seed", "group", "synthesizer"}  # synthetic_speech: speechsynth.write_words
SPEECH_DEFAULTS = {"words": "digits", "takes": 1, "seed": 0, "synthesizer": "espeak"}  # group: the synthesizer's name


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in: mappings recursively, anything else (lists too) replaced."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_config(path: Path) -> dict[str, Any]:
    """A benchmark config, checked: known keys, a name, runs with unique names (default: one run)."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or not config.get("name"):
        raise SystemExit(f"{path}: expected a mapping with a 'name'")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise SystemExit(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(CONFIG_KEYS))})")
    runs = config.get("runs") or [{"name": config["name"]}]
    for run in runs:
        if not isinstance(run, dict) or not run.get("name") or set(run) - RUN_KEYS:
            raise SystemExit(f"{path}: each run needs a 'name' and may have 'overrides', got {run!r}")
    names = [run["name"] for run in runs]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: run names must be unique: {names}")
    if config.get("synthetic_speech") is not None:
        config["synthetic_speech"] = speech_specs(path, config["synthetic_speech"])
    return {**config, "runs": runs, "overrides": config.get("overrides") or {}}


def speech_specs(path: Path, speech: Any) -> list[dict[str, Any]]:
    """``synthetic_speech`` (a mapping or a list of them) checked, as a list with the defaults filled in."""
    from audiocnn.speechsynth import SYNTHESIZERS

    specs = []
    for spec in speech if isinstance(speech, list) else [speech]:
        if (not isinstance(spec, dict) or set(spec) - SPEECH_KEYS or not isinstance(spec.get("voices"), int)
                or spec["voices"] < 1 or spec.get("synthesizer", SPEECH_DEFAULTS["synthesizer"]) not in SYNTHESIZERS):
            raise SystemExit(f"{path}: synthetic_speech needs 'voices' (an integer >= 1) and may have "
                             f"{', '.join(sorted(SPEECH_KEYS - {'voices'}))} (synthesizer: "
                             f"{' or '.join(SYNTHESIZERS)}), got {spec!r}")
        filled = {**SPEECH_DEFAULTS, **spec}
        specs.append({**filled, "group": filled.get("group") or filled["synthesizer"]})
    groups = [spec["group"] for spec in specs]
    if len(set(groups)) != len(groups):
        raise SystemExit(f"{path}: synthetic_speech groups must differ (they name the files): {groups}")
    return specs


def stage_outputs() -> set[str]:
    """Every ``outs`` path of dvc.yaml (a source that a stage makes stays relative to the workspace)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])}


def base_params(config: dict[str, Any]) -> dict[str, Any]:
    """params.yaml with the config's overrides; a relative source outside the pipeline made absolute."""
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")), config["overrides"])
    source = Path(params["ingest"]["source"])
    if not source.is_absolute() and source.as_posix() not in stage_outputs():
        params["ingest"]["source"] = str((REPO / source).resolve())
    return params


def source_with_speech(source: Path, dest: Path, speech: list[dict[str, Any]], sample_rate: int) -> int:
    """A copy of ``source`` in ``dest`` with synthetic spoken words added (``synthetic_speech``); clips added.

    ``speech``: checked ``synthetic_speech`` specs (``read_config`` fills the defaults); ``words``
    is "digits" (FSDD's labels 0-9), "LABEL=TEXT,..." or a mapping label -> text. The copy keeps
    the dataset itself read-only; the synthetic clips land beside its files, named
    ``{label}_{group}_{index}.wav``, so the config's pattern gives each spec a fold of its own
    (``group``), which no run names as a test fold.
    """
    from audiocnn import speechsynth

    shutil.copytree(source, dest)
    return sum(speechsynth.write_words(dest, speechsynth.words_from(spec["words"]), spec["voices"], spec["takes"],
                                       sample_rate, spec["seed"], spec["group"], spec["synthesizer"])
               for spec in speech)


def make_workspace(root: Path, params: dict) -> Path:
    """A fresh git + DVC workspace holding the pipeline and ``params``."""
    for name in PIPELINE_FILES:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    write_params(root, params)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "benchmark workspace"]):
        subprocess.run(cmd, cwd=root, env=common.tool_env(), check=True, capture_output=True)
    return root


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def timed_stage(root: Path, stage: str, env: dict[str, str]) -> dict[str, Any]:
    """One stage through DVC: wall and CPU seconds, peak RSS (MiB), whether it ran (False: up to date)."""
    result = common.timed(["dvc", "repro", "--single-item", stage], root, env)
    output = result.pop("output")
    return {**result, "ran": f"Running stage '{stage}'" in output}


def run_variant(root: Path, params: dict, env: dict[str, str]) -> dict[str, Any]:
    """Write ``params``, reproduce the stages, collect test metrics, training speed and the load around it."""
    write_params(root, params)
    stages = [s for s in STAGES if (s != "demo" or params["ingest"]["source"] in stage_outputs())
              and (s != "export" or params["model"]["arch"] == "cnn")]  # export takes the log-mel cnn only
    load_before = os.getloadavg()[0]
    timings, export_failure = {}, None
    for stage in stages:
        try:
            timings[stage] = timed_stage(root, stage, env)
        except RuntimeError as err:  # export's parity gate: the model is trained and evaluated, report and go on
            if stage != "export":
                raise
            export_failure = failure_line(str(err))
            print(f"  export failed: {export_failure}", flush=True)
    evaluation = json.loads((root / "metrics/eval.json").read_text())
    training = json.loads((root / "metrics/train.json").read_text())
    timing_file = root / "reports/train/timing.json"  # samples_per_second, train_seconds (git-ignored side file)
    training.update(json.loads(timing_file.read_text()) if timing_file.is_file() else {})
    kept = "best" if "best_val_accuracy" in training else "final" if "final_val_accuracy" in training else None
    return {
        "accuracy": evaluation["accuracy"], "macro_f1": evaluation["macro_f1"], "test_clips": evaluation["clips"],
        "samples_per_second": training.get("samples_per_second"), "train_seconds": training.get("train_seconds"),
        "epochs_run": training.get("epochs_run"), "parameters": training.get("parameters"),
        # the saved model's: the best epoch's, or the final one's (train.restore_best false)
        "kept": kept, "kept_epoch": training.get(f"{kept}_epoch"), "val_accuracy": training.get(f"{kept}_val_accuracy"),
        # with test_warps, test_stretches or test_shifts: the trained network's own
        "val_accuracy_without_warps": training.get("without_warps", {}).get(f"{kept}_val_accuracy"),
        "export": ({"failed": export_failure} if export_failure
                   else export_figures(root) if "export" in timings else None),
        "peak_rss_mib": max(t["peak_rss_mib"] for t in timings.values()),
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "stages": timings,
    }


def export_figures(root: Path) -> dict[str, Any]:
    """The exported model's parity with evaluate on the test split (metrics/export.json)."""
    figures = json.loads((root / "metrics/export.json").read_text())
    return {"top1_agreement": figures["float"]["top1_agreement"], "mean_abs_diff": figures["float"]["mean_abs_diff"],
            "int8_accuracy": figures.get("int8", {}).get("accuracy")}


def failure_line(output: str) -> str:
    """The stage's own error line (audiocnn.stage logs one, naming what failed), else the output's last line."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line.split("ERROR", 1)[1].split(":", 1)[-1].strip() for line in lines if " ERROR audiocnn" in line]
    return errors[-1] if errors else (lines[-1].strip() if lines else "no output")


def export_cell(figures: dict[str, Any] | None) -> str:
    if not figures:
        return "-"
    if figures.get("failed"):
        return "failed: " + figures["failed"]
    int8 = f" / {figures['int8_accuracy']:.4f}" if figures.get("int8_accuracy") is not None else ""
    return f"{figures['top1_agreement']:.3f} / {figures['mean_abs_diff']:.1e}{int8}"


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and population std of the runs' test accuracy and macro-F1, their saved models' mean validation
    accuracy (None when a run has none: the seed arch's fold without validation) and which epochs those
    models are (``kept``: best, final, or best/final), with model.test_warps, test_stretches or test_shifts the trained
    networks' own, mean and max training seconds."""
    acc, f1 = [r["accuracy"] for r in runs.values()], [r["macro_f1"] for r in runs.values()]
    seconds = [r["train_seconds"] or 0.0 for r in runs.values()]
    val = [r.get("val_accuracy") for r in runs.values()]
    kept = {r.get("kept") for r in runs.values()}
    unwarped = [r.get("val_accuracy_without_warps") for r in runs.values()]
    return {"runs": len(acc), "accuracy_mean": round(statistics.mean(acc), 6),
            "accuracy_std": round(statistics.pstdev(acc), 6), "macro_f1_mean": round(statistics.mean(f1), 6),
            "macro_f1_std": round(statistics.pstdev(f1), 6),
            "val_accuracy_mean": round(statistics.mean(val), 6) if None not in val else None,
            "kept": "/".join(sorted(k for k in kept if k)) or None,  # "best", "final", or "best/final" when mixed
            "val_accuracy_without_warps_mean": round(statistics.mean(unwarped), 6) if None not in unwarped else None,
            "train_seconds_mean": round(statistics.mean(seconds), 1), "train_seconds_max": round(max(seconds), 1)}


def markdown(results: dict[str, Any], command: str) -> list[str]:
    """The results of one config as a Markdown section: header, one row per run, the summary."""
    lines = common.header(results["name"], command, results["machine"])
    if results.get("description"):
        lines[1:1] = ["", results["description"].strip()]
    if results.get("synthetic_speech"):
        speech = results["synthetic_speech"]
        made = "; ".join(f"{spec['voices']} {spec['synthesizer']} voices x {spec['takes']} take(s), "
                         f"seed {spec['seed']}, fold `{spec['group']}`" for spec in speech["specs"])
        lines[-1:-1] = ["", f"Training data: {speech['clips']} synthetic clips (`audiocnn speak`: {made}) added to a "
                        f"copy of {speech['source']}."]
    stage_names = [s for s in STAGES if any(s in r["stages"] for r in results["runs"].values())]
    columns = ["run", "accuracy", "macro-F1", "test clips", "epochs", "val accuracy (kept epoch)", "train samples/s",
               "train s",
               *(f"{s} s" for s in stage_names), "export: agreement / mean abs dp / int8 accuracy", "peak MiB",
               "load 1 min (start/end)"]
    rows = []
    for name, r in results["runs"].items():
        cells = [f"{r['stages'][s]['seconds']:.1f}" + ("" if r["stages"][s]["ran"] else "*") if s in r["stages"]
                 else "-" for s in stage_names]
        val = r.get("val_accuracy")
        rows.append([name, f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", r["test_clips"], r["epochs_run"],
                     "-" if val is None else f"{val:.4f} ({r['kept']} {r['kept_epoch']})",
                     f"{r['samples_per_second'] or 0:.0f}",
                     f"{r['train_seconds'] or 0:.0f}", *cells,
                     export_cell(r.get("export")), f"{r['peak_rss_mib']:.0f}", "{:.1f} / {:.1f}".format(*r["load_1min"])])
    lines += common.table(columns, rows)
    if "summary" in results:
        s = results["summary"]
        lines += ["", f"Mean test accuracy over {s['runs']} runs: **{s['accuracy_mean']:.4f}** "
                  f"(std {s['accuracy_std']:.4f}); macro-F1 {s['macro_f1_mean']:.4f} (std {s['macro_f1_std']:.4f}); "
                  f"training {s['train_seconds_mean']:.0f} s per run on average, at most {s['train_seconds_max']:.0f} s."]
        if s.get("val_accuracy_mean") is not None:
            unwarped = s.get("val_accuracy_without_warps_mean")
            lines += ["", f"Mean validation accuracy of the saved models ({s['kept']} epoch) over {s['runs']} runs: "
                      f"{s['val_accuracy_mean']:.4f}"
                      + ("." if unwarped is None else f" ({unwarped:.4f} without the test-time warps, stretches and "
                                                        "shifts, model.test_warps, test_stretches and test_shifts).")]
    lines += ["", f"Total wall time {results['wall_seconds'] / 60:.1f} min. `*`: stage up to date (DVC skipped it; "
              "the time is DVC's check). `train s`: the fit itself; the train stage column adds start-up and writing. "
              "Export: the exported float model's top-1 agreement with evaluate, its mean absolute probability "
              "difference, and the int8 model's test accuracy."]
    return lines


def run_config(path: Path, wanted: set[str], out: Path, keep: bool, command: str,
               seeds: list[int] | None = None) -> list[str]:
    """Every (wanted) run of one config, once per seed of ``seeds`` (default: once, the configured seed),
    in one fresh workspace; writes and returns its Markdown."""
    config = read_config(path)
    name, base = config["name"], base_params(config)
    variants = [v for v in config["runs"] if not wanted or v["name"] in wanted]
    if not variants:
        print(f"[{name}] skipped: none of --runs {','.join(sorted(wanted))}", file=sys.stderr)
        return []
    workspace = Path(tempfile.mkdtemp(prefix=f"audiocnn-bench-{name}-"))
    env = common.tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}")
    results: dict[str, Any] = {"name": name, "description": config.get("description", ""), "config": str(path),
                               "command": command, "runs": {}, "params": {}}
    started = time.perf_counter()
    source_copy = None
    try:
        if config.get("synthetic_speech"):
            source_copy = Path(f"{workspace}-source")
            added = source_with_speech(Path(base["ingest"]["source"]), source_copy, config["synthetic_speech"],
                                       base["audio"]["sample_rate"])
            results["synthetic_speech"] = {"specs": config["synthetic_speech"], "clips": added,
                                           "source": base["ingest"]["source"]}
            print(f"[{name}] {added} synthetic clips added to a copy of {base['ingest']['source']}", file=sys.stderr)
            base["ingest"]["source"] = str(source_copy)
        make_workspace(workspace, base)
        for variant in variants:
            for seed in seeds or [None]:
                run_name = variant["name"] if seed is None else f"{variant['name']}/seed{seed}"
                print(f"[{name}] run {run_name}", file=sys.stderr, flush=True)
                params = deep_merge(base, variant.get("overrides") or {})
                if seed is not None:
                    params = deep_merge(params, {"train": {"seed": seed}})
                results["runs"][run_name] = run_variant(workspace, params, env)
                results["params"][run_name] = params
    finally:
        if keep:
            print(f"[{name}] workspace kept: {workspace}", file=sys.stderr)
        else:
            shutil.rmtree(workspace, ignore_errors=True)
            if source_copy is not None:
                shutil.rmtree(source_copy, ignore_errors=True)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["machine"] = common.machine()  # load average at the end
    if config.get("summary") and len(results["runs"]) > 1:
        results["summary"] = summarize(results["runs"])
    lines = markdown(results, command)
    common.write_results(out / name, name, results, lines)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", type=Path, nargs="+", metavar="CONFIG", help="benchmarks/configs/*.yaml")
    parser.add_argument("--runs", default="", help="comma-separated subset of the configs' runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="results go to OUT/<config name>/ (default benchmarks/results)")
    parser.add_argument("--seeds", default="", help="comma-separated train.seed values: every run once per seed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspaces")
    args = parser.parse_args(argv)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    command = " ".join(["python", "benchmarks/pipeline.py", *(sys.argv[1:] if argv is None else argv)])
    wanted = {name for name in args.runs.split(",") if name}
    ran = [run_config(path, wanted, args.out, args.keep, command, seeds) for path in args.configs]
    if not any(ran):
        raise SystemExit(f"no run named {args.runs!r} in {', '.join(map(str, args.configs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
