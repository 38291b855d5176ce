"""Run the DVC pipeline for a dataset config in a temporary workspace and tabulate the results.

    python benchmarks/pipeline.py benchmarks/configs/fsdd_official.yaml [--runs NAME,...] [--out DIR]

A config deep-merges `overrides` into the repo's params.yaml; optional `runs` are
variants (e.g. leave-one-speaker-out folds) run one after another in the same
workspace, so DVC recomputes only the stages a variant changes. Each stage runs as
its own `dvc repro --single-item`, timed, with its peak resident memory from
wait4(). The workspace is a fresh git repo in a temporary directory: nothing is
written into the dataset or into this repository's own outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["demo", "ingest", "normalize", "spectrogram", "split", "train", "evaluate"]
PIPELINE_FILES = ["dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvcignore", ".gitignore"]


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for key, value in (("GIT_AUTHOR_NAME", "audiocnn bench"), ("GIT_AUTHOR_EMAIL", "bench@audiocnn.invalid")):
        env.setdefault(key, value)
        env.setdefault(key.replace("AUTHOR", "COMMITTER"), value)
    return env


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
        subprocess.run(cmd, cwd=root, env=tool_env(), check=True, capture_output=True)
    return root


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def timed_stage(root: Path, stage: str, env: dict[str, str]) -> dict:
    """Run one stage through DVC; wall seconds, peak RSS (MiB) and whether it ran."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["dvc", "repro", "--single-item", stage], cwd=root, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed in {root}:\n{output[-4000:]}")
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB; max over the stage's processes
        "ran": f"Running stage '{stage}'" in output,
    }


def run_variant(root: Path, params: dict, env: dict[str, str]) -> dict:
    write_params(root, params)
    stages = {stage: timed_stage(root, stage, env) for stage in STAGES}
    evaluation = json.loads((root / "metrics/eval.json").read_text())
    training = json.loads((root / "metrics/train.json").read_text())
    training.update(json.loads((root / "reports/train/timing.json").read_text()))
    return {
        "accuracy": evaluation["accuracy"],
        "macro_f1": evaluation["macro_f1"],
        "test_clips": evaluation.get("clips"),
        "samples_per_second": training.get("samples_per_second"),
        "train_seconds": training.get("train_seconds"),
        "epochs_run": training.get("epochs_run"),
        "stages": stages,
    }


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def markdown(name: str, results: dict, command: str) -> str:
    lines = [
        f"### {name}", "",
        f"Command: `{command}`  ", f"Machine: {results['machine']}  ", f"Date: {results['date']}", "",
        "| run | accuracy | macro-F1 | test clips | train samples/s | train s | "
        + " | ".join(f"{s} s" for s in STAGES) + " | peak MiB |",
        "|---" * (6 + len(STAGES) + 1) + "|",
    ]
    for run_name, row in results["runs"].items():
        stage_cells = [f"{row['stages'][s]['seconds']:.1f}" + ("" if row["stages"][s]["ran"] else "*") for s in STAGES]
        peak = max(v["peak_rss_mib"] for v in row["stages"].values() if v["ran"]) if any(
            v["ran"] for v in row["stages"].values()) else 0.0
        lines.append(
            f"| {run_name} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | {row['test_clips']} | "
            f"{row['samples_per_second'] or 0:.0f} | {row['train_seconds'] or 0:.0f} | "
            + " | ".join(stage_cells) + f" | {peak:.0f} |"
        )
    if "summary" in results:
        s = results["summary"]
        lines += ["", f"Mean accuracy over {s['runs']} runs: {s['accuracy_mean']:.4f} "
                  f"(std {s['accuracy_std']:.4f}); mean macro-F1 {s['macro_f1_mean']:.4f}."]
    lines += ["", "`*`: stage up to date (DVC skipped it; the time is DVC's check)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--runs", default="", help="comma-separated subset of the config's runs")
    parser.add_argument("--out", type=Path, default=None, help="results dir (default benchmarks/results/<name>)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args(argv)

    config = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    name = config["name"]
    base = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")), config.get("overrides", {}))
    source = Path(base["ingest"]["source"])
    base["ingest"]["source"] = str(source if source.is_absolute() else (REPO / source).resolve())
    variants = config.get("runs") or [{"name": name, "overrides": {}}]
    if args.runs:
        wanted = set(args.runs.split(","))
        variants = [v for v in variants if v["name"] in wanted]
    out = args.out or REPO / "benchmarks" / "results" / name
    command = " ".join(["python", "benchmarks/pipeline.py", *sys.argv[1:]]) if argv is None else " ".join(argv)

    workspace = Path(tempfile.mkdtemp(prefix=f"audiocnn-bench-{name}-"))
    env = tool_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workspace / 'mlflow.db'}"
    results: dict = {"name": name, "machine": machine(), "date": date.today().isoformat(), "runs": {}}
    try:
        make_workspace(workspace, base)
        for variant in variants:
            print(f"[{name}] run {variant['name']}", file=sys.stderr, flush=True)
            params = deep_merge(base, variant.get("overrides", {}))
            results["runs"][variant["name"]] = run_variant(workspace, params, env)
    finally:
        if not args.keep:
            shutil.rmtree(workspace, ignore_errors=True)
    if len(results["runs"]) > 1:
        import statistics

        acc = [r["accuracy"] for r in results["runs"].values()]
        f1 = [r["macro_f1"] for r in results["runs"].values()]
        results["summary"] = {
            "runs": len(acc), "accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.pstdev(acc),
            "macro_f1_mean": statistics.mean(f1),
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(name, results, command), encoding="utf-8")
    print(markdown(name, results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
