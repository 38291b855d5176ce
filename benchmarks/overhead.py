"""Pipeline overhead: a no-op `dvc repro`, `dvc exp run -S train.lr=...`, and `dvc repro` after adding 1% new clips.

    python benchmarks/overhead.py [--clips 3000 [--fsdd FOLDER] | --synthetic 30000] [--epochs 1] [--noop-runs 5] [--set KEY=VALUE]

A fresh git + DVC workspace (benchmarks/pipeline.py's helpers) in a temporary folder runs the
pipeline on FSDD (``--clips`` files, hard-linked into a temporary source folder, never written)
(or ``--synthetic`` generated clips) with the FSDD front end and ``train.epochs=--epochs``; the feature cache lives in the
temporary folder (AUDIOCNN_CACHE_DIR), cold at the start. Measured:

1. full run: every stage as its own timed `dvc repro --single-item` (DVC's checks and output
   hashing included);
2. no-op `dvc repro` (nothing changed), median of ``--noop-runs`` (target <= 1.5 s);
3. +1% clips: new links in the source, the stages again (target: spectrogram <= 10% of its
   full-run time, thanks to the feature cache);
4. `dvc exp run -S train.lr=...`: which stages ran (target: only train, evaluate and export).

The export stage runs without its parity gates: they judge a trained model, and a model of one
epoch on a few clips can flip a near-tie between int8 and float; this benchmark times DVC.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import pipeline  # noqa: E402  (workspace helpers, shared with benchmarks/pipeline.py)

# The 1% added later: every 100th clip from the 50th, spread over classes (and speakers) but not
# the first clips of a class in name order, which the gallery shows: a changed gallery is one
# matplotlib figure (about a second, whatever the data size), measured apart from the clips.
HELD_OUT = slice(50, None, 100)
NOOP_TARGET_S = 1.5
INCREMENTAL_TARGET = 0.10


UNGATED_EXPORT = {"min_top1_agreement": 0.0, "max_mean_abs_diff": 1.0, "max_int8_accuracy_drop": 1.0,
                  "calibration_windows": 32}

def dvc(args: list[str], root: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {root}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def all_stages(root: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {stage: pipeline.timed_stage(root, stage, env) for stage in pipeline.STAGES}


def stages_alone(tmp: Path, origin: Path, files: list[Path], held_out: list[Path],
                 params: dict[str, Any], repeats: int) -> dict[str, Any]:
    """ingest, normalize and spectrogram as plain subprocesses (no DVC): cold cache, then after adding ``held_out``.

    The +1% runs are repeated ``repeats`` times, each from the cache as the full run left it
    (a hard-linked copy: the cache never writes a kept file in place); each stage's median is reported.
    """
    source, root, cache = tmp / "alone-source", tmp / "alone", tmp / "alone-cache"
    source.mkdir()
    link_all(files, origin, source, skip=held_out)
    path = common.write_params(root / "params.yaml", dict(params, ingest={**params["ingest"], "source": str(source)}))
    env = common.tool_env(AUDIOCNN_CACHE_DIR=str(cache))
    stages = ("ingest", "normalize", "spectrogram")
    result: dict[str, Any] = {"full": {}, "added": {}, "added_runs": {stage: [] for stage in stages}}
    for stage in stages:
        result["full"][stage] = common.timed(common.stage_cmd(stage, path, root), root, env)
        result["full"][stage].pop("output")
    link_all(held_out, origin, source)
    snapshot = tmp / "alone-cache-after-full"
    subprocess.run(["cp", "-al", str(cache), str(snapshot)], check=True)
    for repeat in range(repeats):
        if repeat:
            shutil.rmtree(cache)
            subprocess.run(["cp", "-al", str(snapshot), str(cache)], check=True)
        for stage in stages:
            timing = common.timed(common.stage_cmd(stage, path, root), root, env)
            timing.pop("output")
            result["added_runs"][stage].append(timing)
    for stage, runs in result["added_runs"].items():
        result["added"][stage] = {"seconds": common.median([run["seconds"] for run in runs])}
    return result


def link(path: Path, dest: Path) -> None:
    """A hard link (ingest refuses symlinks that leave the source), else a copy; the original is never written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, dest)
    except OSError:
        shutil.copy2(path, dest)


def link_all(files: Sequence[Path], origin: Path, dest: Path, skip: Sequence[Path] = ()) -> None:
    """``link`` each of ``files`` (under ``origin``) to the same relative path under ``dest``, except ``skip``."""
    skipped = set(skip)
    for path in files:
        if path not in skipped:
            link(path, dest / path.relative_to(origin))


def git(args: list[str], root: Path, env: dict[str, str]) -> None:
    subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=common.FSDD, help="FSDD recordings (unless --synthetic)")
    parser.add_argument("--clips", type=int, default=3000, help="FSDD files used (evenly spaced in name order)")
    parser.add_argument("--synthetic", type=int, default=0,
                        help="use this many generated clips (benchmarks/common.py) instead of FSDD")
    parser.add_argument("--synthetic-shape", type=common.clip_shape, default=common.FSDD_SIZED, metavar="LO,HI,HZ",
                        help="generated clips' seconds (drawn in LO..HI) and rate (default: 0.3,0.6,8000)")
    parser.add_argument("--front-end", choices=common.FRONT_ENDS, default="fsdd",
                        help="generated set's audio and spectrogram params: FSDD's (default) or params.yaml's")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--noop-runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="+1%% runs of the stages alone (median reported)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key, e.g. spectrogram.images=false (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results" / "overhead")
    args = parser.parse_args(argv)
    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    fsdd = None if args.synthetic else common.fsdd_recordings(args.fsdd)
    tmp = Path(tempfile.mkdtemp(prefix="audiocnn-overhead-", dir=args.workdir))
    results: dict[str, Any] = {}
    try:
        if args.synthetic:
            lo, hi, rate = args.synthetic_shape
            origin = common.synthetic_clips(tmp / "generated", args.synthetic, rate=rate, seconds=(lo, hi))
            files = sorted(origin.rglob("*.wav"))
        else:
            origin = fsdd
            every = sorted(origin.glob("*.wav"))
            files = every[:: max(1, len(every) // args.clips)][: args.clips]  # spread over classes and speakers
        held_out = files[HELD_OUT]  # 1%: added later
        source = tmp / "source"
        source.mkdir()
        link_all(files, origin, source, skip=held_out)
        sections = {"train": {"epochs": args.epochs, "warmup_epochs": 0}, "export": UNGATED_EXPORT}
        if args.synthetic:
            params = common.folders_params(source, args.front_end, **sections)
        else:
            params = common.fsdd_params(source, split={"strategy": "stratified", "test_folds": [], "val_folds": []},
                                        **sections)
        params = common.set_params(params, args.set)
        root = pipeline.make_workspace(tmp / "workspace", params)
        env = common.tool_env(AUDIOCNN_CACHE_DIR=str(tmp / "cache"),
                              MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'workspace' / 'mlflow.db'}")
        print(f"[overhead] full run on {len(files) - len(held_out)} clips", file=sys.stderr, flush=True)
        results["full"] = all_stages(root, env)
        git(["add", "-A"], root, env)
        git(["commit", "-qm", "full run"], root, env)
        noop = []
        for _ in range(args.noop_runs):
            seconds, output = dvc(["repro"], root, env)
            noop.append({"seconds": round(seconds, 3), "ran": stages_run(output)})
        results["noop"] = {"runs": noop, "median_s": common.median([r["seconds"] for r in noop])}
        link_all(held_out, origin, source)
        print(f"[overhead] +{len(held_out)} clips", file=sys.stderr, flush=True)
        results["added"] = {"clips": len(held_out), "stages": all_stages(root, env)}
        git(["add", "-A"], root, env)
        git(["commit", "-qm", "+1% clips"], root, env)
        seconds, output = dvc(["exp", "run", "-S", f"train.lr={params['train']['lr'] * 1.5:g}"], root, env)
        results["exp_run"] = {"seconds": round(seconds, 2), "ran": stages_run(output)}
        print("[overhead] stages alone", file=sys.stderr, flush=True)
        results["alone"] = stages_alone(tmp, origin, files, held_out, params, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = "FSDD"
    if args.synthetic:
        data = f"{args.synthetic} generated clips{common.shape_note(args.synthetic_shape)}" + (
            f", {args.front_end} front end" if args.front_end != "fsdd" else "")
    results.update(clips=len(files), data=data,
                   machine=common.machine())
    common.write_results(args.out, "overhead", results, markdown(results, command))
    return 0


def markdown(results: dict[str, Any], command: str) -> list[str]:
    lines = common.header("Pipeline overhead (DVC)", command, results["machine"])
    lines += [f"Data: {results.get('data', 'FSDD')}", ""]
    full, added = results["full"], results["added"]["stages"]
    rows = []
    for stage in full:
        ratio = added[stage]["seconds"] / full[stage]["seconds"]
        rows.append([stage, f"{full[stage]['seconds']:.1f}" + ("" if full[stage]["ran"] else "*"),
                     f"{added[stage]['seconds']:.1f}" + ("" if added[stage]["ran"] else "*"), f"{ratio:.2f}"])
    total_full = sum(s["seconds"] for s in full.values())
    total_added = sum(s["seconds"] for s in added.values())
    rows.append(["**all**", f"{total_full:.1f}", f"{total_added:.1f}", f"{total_added / total_full:.2f}"])
    lines += common.table(["stage", f"full run s ({results['clips'] - results['added']['clips']} clips)",
                           f"+{results['added']['clips']} clips s", "ratio"], rows)
    spec = added["spectrogram"]["seconds"] / full["spectrogram"]["seconds"]
    noop = results["noop"]
    lines += ["", "`*`: DVC found the stage up to date. Each stage is one `dvc repro --single-item` (DVC's "
              "dependency checks and output hashing included).", "",
              f"- no-op `dvc repro`: median {noop['median_s']:.2f} s of {len(noop['runs'])} "
              f"({', '.join(format(r['seconds'], '.2f') for r in noop['runs'])}); stages run: "
              f"{sorted({s for r in noop['runs'] for s in r['ran']}) or 'none'}; target <= {NOOP_TARGET_S} s: "
              f"{'met' if noop['median_s'] <= NOOP_TARGET_S else '**not met**'}",
              f"- spectrogram after +1% clips: {100 * spec:.1f}% of its full-run time; target <= "
              f"{100 * INCREMENTAL_TARGET:.0f}%: {'met' if spec <= INCREMENTAL_TARGET else '**not met**'}",
              f"- `dvc exp run -S train.lr=...`: {results['exp_run']['seconds']:.1f} s, stages run: "
              f"{results['exp_run']['ran']} (target: train, evaluate and export only)", "",
              "The same stages as plain subprocesses (no DVC), cold feature cache, then after adding the 1% "
              "(median of the repeats, each from the cache as the full run left it):", ""]
    alone = results["alone"]
    lines += common.table(["stage", "full run s", "+1% clips s (median)", "runs s", "ratio"], [
        [stage, f"{alone['full'][stage]['seconds']:.2f}", f"{alone['added'][stage]['seconds']:.2f}",
         " / ".join(f"{run['seconds']:.2f}" for run in alone.get("added_runs", {}).get(stage, [])),
         f"{alone['added'][stage]['seconds'] / alone['full'][stage]['seconds']:.2f}"] for stage in alone["full"]])
    spec_alone = alone["added"]["spectrogram"]["seconds"] / alone["full"]["spectrogram"]["seconds"]
    lines += ["", f"- spectrogram alone after +1% clips: {100 * spec_alone:.1f}% of its full run; target <= "
              f"{100 * INCREMENTAL_TARGET:.0f}%: {'met' if spec_alone <= INCREMENTAL_TARGET else '**not met**'}"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
