"""Feature throughput: clips/s of the normalize and spectrogram stages against the seed notebook and plain librosa.

    python benchmarks/features.py [--fsdd FOLDER|""] [--synthetic 30000] [--seed-clips 300] [--plain-clips 3000] [--repeats 3] [--ceiling-seconds 2]
                                  [--set spectrogram.images=false] [--warm-memory GB]
                                  [--synthetic-shape LO,HI,HZ] [--front-end fsdd|params]

On FSDD (read in place) and on ``--synthetic`` generated clips (FSDD-sized by default, in a temp
folder; ``--synthetic-shape`` and ``--front-end params`` make them demo-sized clips through
params.yaml's 16 kHz front end), in the same run and on the same files:

* ours: ``stages/normalize.py`` then ``stages/spectrogram.py`` as subprocesses, exactly as DVC
  runs them (process start, imports, pool, index, gallery included), with 1 worker and with
  all cores (``--workers``, taking turns within each repeat), the feature cache off; median of
  ``--repeats`` runs;
* seed: the notebook's method on the first ``--seed-clips`` files: ``librosa.load`` at its
  default 22050 Hz, ``librosa.feature.melspectrogram``, a matplotlib ``specshow`` figure
  (default size, time and mel axes) saved as PNG, ``plt.close``; one process;
* plain librosa: one process, ``librosa.load`` at audio.sample_rate, melspectrogram with our
  front-end params, ``power_to_db``, ``np.save`` per clip, on the first ``--plain-clips``;
* the stages' start, in every repeat: each stage script with ``--help`` (interpreter and imports,
  the part of a run that no worker shares), and the most the worker counts could gain with that
  part whole and the rest divided at the machine's ceiling (``start_bound``);
* the machine's own ceiling, in every repeat beside ours: the same CPU-bound loop (numpy FFTs,
  about ``--ceiling-seconds``) in one process alone, then in as many processes at once as the
  largest worker count; N x (time alone) / (time of N at once). On a shared virtual machine the
  cores are not always all ours, and no stage can scale better than this.

``--warm-memory GB`` first touches that much fresh memory in a child process (``common.warm_memory``):
on a virtual machine that backs guest memory only on first touch, the stages' page-cache
writes otherwise pay for it in kernel time by luck of which free pages they get.

Ratios compare rates measured in the same run. Outputs go to a temporary folder only.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def source_files(params: dict[str, Any], limit: int) -> list[Path]:
    """The first ``limit`` files of the ingest manifest (sorted by path), as absolute paths."""
    import pandas as pd

    manifest = pd.read_csv(params["_root"] / "dataset/ingest/manifest.csv", dtype=str, keep_default_na=False)
    return [Path(params["ingest"]["source"]) / p for p in manifest["path"][:limit]]


def seed_method(files: list[Path], out: Path) -> float:
    """The notebook's per-clip loop; clips per second."""
    import matplotlib

    matplotlib.use("Agg")
    import librosa
    import librosa.display
    import matplotlib.pyplot as plt

    def one(path: Path, i: int) -> None:
        y, sr = librosa.load(path)  # default sr=22050
        mel = librosa.feature.melspectrogram(y=y, sr=sr)
        plt.figure()
        librosa.display.specshow(librosa.power_to_db(mel, ref=np.max), sr=sr, x_axis="time", y_axis="mel")
        plt.savefig(out / f"{i:06d}.png")
        plt.close()

    out.mkdir(parents=True, exist_ok=True)
    one(files[0], -1)  # imports and caches warm, as in a notebook that already ran a cell
    start = time.perf_counter()
    for i, path in enumerate(files):
        one(path, i)
    return len(files) / (time.perf_counter() - start)


def plain_librosa(files: list[Path], out: Path, params: dict[str, Any]) -> float:
    """A plain single-process librosa loop with our front-end params; clips per second."""
    import librosa

    sp, rate = params["spectrogram"], params["audio"]["sample_rate"]
    out.mkdir(parents=True, exist_ok=True)

    def one(path: Path, i: int) -> None:
        y, _ = librosa.load(path, sr=rate)
        mel = librosa.feature.melspectrogram(y=y, sr=rate, n_fft=sp["n_fft"], hop_length=sp["hop_length"],
                                             n_mels=sp["n_mels"], fmin=sp["fmin"], fmax=sp["fmax"])
        np.save(out / f"{i:06d}.npy", librosa.power_to_db(mel, ref=1.0, top_db=sp["top_db"]).T.astype(np.float32))

    one(files[0], -1)
    start = time.perf_counter()
    for i, path in enumerate(files):
        one(path, i)
    return len(files) / (time.perf_counter() - start)


def _busy(iterations: int) -> float:
    """A CPU-bound loop (numpy FFTs of 8,000 samples, one thread); its wall seconds."""
    from threadpoolctl import threadpool_limits

    x = np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    start = time.perf_counter()
    with threadpool_limits(1):
        for _ in range(iterations):
            np.fft.rfft(x)
    return time.perf_counter() - start


def machine_ceiling(processes: int, iterations: int) -> float:
    """``processes`` x (seconds of ``_busy`` alone) / (seconds of ``processes`` copies at once), forked processes."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        alone = pool.apply(_busy, (iterations,))
    with context.Pool(processes) as pool:
        start = time.perf_counter()
        pool.map(_busy, [iterations] * processes, chunksize=1)
        together = time.perf_counter() - start
    return processes * alone / together


def ceiling_iterations(seconds: float) -> int:
    """Iterations of ``_busy`` that take about ``seconds`` here."""
    probe = 2000
    return max(1, round(probe * seconds / max(_busy(probe), 1e-6)))


def ours(root: Path, params: dict[str, Any], workers: list[int], repeats: int,
         ceiling_seconds: float = 0.0) -> dict[int, dict[str, Any]]:
    """normalize + spectrogram stage subprocesses for each worker count; median seconds over ``repeats``.

    The worker counts take turns within each repeat (1, 2, 1, 2, ...), so a machine that slows
    down or speeds up during the run (shared hosts do) affects every count alike; each repeat
    also gives its own scaling ratio. With ``ceiling_seconds``, each repeat also measures the
    machine's ceiling for the largest worker count (``machine_ceiling``), under key "ceiling".
    """
    env = common.tool_env(AUDIOCNN_CACHE_DIR="off")
    paths = {}
    for count in workers:
        config = copy.deepcopy({k: v for k, v in params.items() if not k.startswith("_")})
        config["normalize"]["workers"] = config["spectrogram"]["workers"] = count
        paths[count] = common.write_params(root / f"params-w{count}.yaml", config)
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {c: {"normalize": [], "spectrogram": []} for c in workers}
    starts: dict[str, list[float]] = {"normalize": [], "spectrogram": []}
    iterations = ceiling_iterations(ceiling_seconds) if ceiling_seconds > 0 else 0
    ceilings: list[float] = []
    for _ in range(repeats):
        if iterations:
            ceilings.append(machine_ceiling(max(workers), iterations))
        for stage, seconds in starts.items():  # the part of a run no worker shares: interpreter and imports
            seconds.append(common.timed(common.stage_cmd(stage, paths[workers[0]], root)[:2] + ["--help"],
                                        root, env)["seconds"])
        for count in workers:
            for stage in ("normalize", "spectrogram"):
                for out in {"normalize": ["dataset/normalize"],
                            "spectrogram": ["dataset/features", "dataset/spectrograms"]}[stage]:
                    shutil.rmtree(root / out, ignore_errors=True)  # as dvc repro does before a stage
                result = common.timed(common.stage_cmd(stage, paths[count], root), root, env)
                result.pop("output")
                runs[count][stage].append(result)
    result: dict[Any, Any] = {count: {stage: {"seconds": common.median([r["seconds"] for r in rs]), "runs": rs}
                                      for stage, rs in stages.items()} for count, stages in runs.items()}
    if ceilings:
        result["ceiling"] = {"processes": max(workers), "per_repeat": ceilings, "median": common.median(ceilings)}
    result["start"] = {stage: {"seconds": common.median(seconds), "runs": seconds} for stage, seconds in starts.items()}
    return result


def start_bound(one_seconds: float, start_seconds: float, ceiling: float) -> float:
    """The most a run of ``one_seconds`` (one worker) can speed up when only its ``start_seconds`` does not
    divide and the rest divides at ``ceiling`` (Amdahl): one / (start + (one - start) / ceiling).

    A start timed longer than the run (noise, on tiny inputs) counts as the whole run: no gain, 1.0.
    """
    start = min(start_seconds, one_seconds)
    return one_seconds / (start + (one_seconds - start) / ceiling)


def measure(name: str, root: Path, params: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    params = dict(params, _root=root)
    path = common.write_params(root / "params.yaml", {k: v for k, v in params.items() if not k.startswith("_")})
    common.timed(common.stage_cmd("ingest", path, root), root, common.tool_env())
    clips = len(source_files(params, 10**9))
    print(f"[{name}] {clips} clips", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"clips": clips, "ours": {}}
    timings = ours(root, params, args.workers, args.repeats, args.ceiling_seconds)
    for key in ("ceiling", "start"):
        if key in timings:
            result[key] = timings.pop(key)
    for workers, timing in timings.items():
        total = timing["normalize"]["seconds"] + timing["spectrogram"]["seconds"]
        timing["clips_per_second"] = {"normalize": clips / timing["normalize"]["seconds"],
                                      "spectrogram": clips / timing["spectrogram"]["seconds"], "both": clips / total}
        result["ours"][workers] = timing
        print(f"[{name}] ours, {workers} worker(s): {timing['clips_per_second']}", file=sys.stderr, flush=True)
    files = source_files(params, args.seed_clips)
    result["seed"] = {"clips": len(files), "clips_per_second": seed_method(files, root / "seed")}
    files = source_files(params, args.plain_clips)
    result["plain"] = {"clips": len(files), "clips_per_second": plain_librosa(files, root / "plain", params)}
    return result


def markdown(results: dict[str, Any], command: str) -> list[str]:
    lines = common.header("Feature throughput (normalize + spectrogram)", command, results["machine"])
    rows = []
    for name, r in results["datasets"].items():
        seed, plain = r["seed"]["clips_per_second"], r["plain"]["clips_per_second"]
        for workers, o in r["ours"].items():
            cps = o["clips_per_second"]
            rows.append([name, r["clips"], f"ours, {workers} worker(s)", f"{cps['normalize']:.0f}",
                         f"{cps['spectrogram']:.0f}", f"{cps['both']:.0f}", f"{cps['both'] / seed:.1f}x",
                         f"{cps['both'] / plain:.1f}x"])
        rows.append([name, r["seed"]["clips"], "seed notebook (1 process)", "", "", f"{seed:.1f}", "1.0x", ""])
        rows.append([name, r["plain"]["clips"], "plain librosa loop (1 process)", "", "", f"{plain:.0f}", "", "1.0x"])
    lines += common.table(["data", "clips", "method", "normalize clips/s", "spectrogram clips/s",
                           "both clips/s", "vs seed", "vs plain"], rows)
    lines += ["", "Stage times are whole subprocesses (start, imports, pool, index, gallery), median of "
              f"{results['repeats']} runs, feature cache off, "
              f"{'params set: ' + ', '.join(results['set']) if results.get('set') else 'PNGs on'}; "
              "'both' = clips / (normalize s + spectrogram s)."]
    if results.get("warm_memory"):
        warm = results["warm_memory"]
        lines.append(f"Memory warmed first: {warm['gigabytes']:g} GB touched in {warm['seconds']:.1f} s.")
    for name, r in results["datasets"].items():
        workers = sorted(r["ours"], key=int)
        if len(workers) > 1:
            one, many = r["ours"][workers[0]], r["ours"][workers[-1]]
            paired = [(a["seconds"] + b["seconds"]) / (c["seconds"] + d["seconds"]) for a, b, c, d in zip(
                one["normalize"]["runs"], one["spectrogram"]["runs"], many["normalize"]["runs"], many["spectrogram"]["runs"])]
            lines.append(f"Scaling on {name}: {workers[-1]} workers / {workers[0]} worker = "
                         f"{many['clips_per_second']['both'] / one['clips_per_second']['both']:.2f}x (both stages), "
                         f"normalize {many['clips_per_second']['normalize'] / one['clips_per_second']['normalize']:.2f}x, "
                         f"spectrogram "
                         f"{many['clips_per_second']['spectrogram'] / one['clips_per_second']['spectrogram']:.2f}x; "
                         f"per repeat (runs side by side) {', '.join(f'{r:.2f}x' for r in paired)}, "
                         f"median {common.median(paired):.2f}x.")
        cpu = []
        for workers in sorted(r["ours"], key=int):
            stages = r["ours"][workers]
            cpu.append(f"{workers} worker(s) " + ", ".join(
                f"{stage} {common.median([x['user_seconds'] for x in stages[stage]['runs']]):.1f} / "
                f"{common.median([x['system_seconds'] for x in stages[stage]['runs']]):.1f} s"
                for stage in ("normalize", "spectrogram")))
        lines.append(f"CPU on {name}, user / system (kernel) seconds of the stage and its workers, medians: "
                     f"{'; '.join(cpu)}.")
        if "ceiling" in r:
            ceiling = r["ceiling"]
            lines.append(f"Machine ceiling on {name} ({ceiling['processes']} CPU-bound processes at once against "
                         f"one alone, each repeat beside ours): {', '.join(f'{c:.2f}x' for c in ceiling['per_repeat'])}, "
                         f"median {ceiling['median']:.2f}x; scaling / ceiling per repeat "
                         f"{', '.join(f'{a / c:.2f}' for a, c in zip(paired, ceiling['per_repeat']))}.")
        counts = sorted(r["ours"], key=int)
        if "start" in r and len(counts) > 1:
            start, one, many = r["start"], r["ours"][counts[0]], r["ours"][counts[-1]]
            one_seconds = one["normalize"]["seconds"] + one["spectrogram"]["seconds"]
            start_seconds = start["normalize"]["seconds"] + start["spectrogram"]["seconds"]
            ceiling = r["ceiling"]["median"] if "ceiling" in r else int(counts[-1]) / int(counts[0])
            bound = start_bound(one_seconds, start_seconds, ceiling)
            measured = many["clips_per_second"]["both"] / one["clips_per_second"]["both"]
            lines.append(f"Start-bound on {name}: starting the stages (interpreter and imports, `stages/<stage>.py "
                         f"--help`, medians) takes normalize {start['normalize']['seconds']:.2f} s and spectrogram "
                         f"{start['spectrogram']['seconds']:.2f} s of the {counts[0]}-worker runs' "
                         f"{one_seconds:.2f} s; with all the rest divided at {ceiling:.2f}x, {counts[-1]} workers "
                         f"could be at most {bound:.2f}x as fast (measured {measured:.2f}x, {measured / bound:.2f} of "
                         f"that bound).")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=common.FSDD,
                        help="FSDD recordings ('' to skip; a folder without .wav files is an error)")
    parser.add_argument("--synthetic", type=int, default=30000, help="generated clips (0 to skip)")
    parser.add_argument("--synthetic-shape", type=common.clip_shape, default=common.FSDD_SIZED, metavar="LO,HI,HZ",
                        help="generated clips' length in seconds (drawn in LO..HI) and rate (default: 0.3,0.6,8000, "
                             "FSDD-sized; the demo's is 1.5,4.0,22050)")
    parser.add_argument("--front-end", choices=common.FRONT_ENDS, default="fsdd",
                        help="audio and spectrogram params of the generated set's runs: FSDD's 8 kHz ones "
                             "(default) or params.yaml's")
    parser.add_argument("--seed-clips", type=int, default=300)
    parser.add_argument("--plain-clips", type=int, default=3000)
    parser.add_argument("--workers", type=lambda s: [int(w) or len(os.sched_getaffinity(0)) for w in s.split(",")],
                        default=[1, len(os.sched_getaffinity(0))], help="comma-separated worker counts (0 = all cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ceiling-seconds", type=float, default=2.0,
                        help="seconds of the machine-ceiling loop per repeat (0 to skip)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key of our stages, e.g. spectrogram.images=false (repeatable)")
    parser.add_argument("--warm-memory", type=float, default=0.0, metavar="GB",
                        help="touch this much fresh memory before the runs (0: don't)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results" / "features")
    args = parser.parse_args(argv)
    command = "python benchmarks/features.py " + " ".join(sys.argv[1:] if argv is None else argv)
    fsdd = None if str(args.fsdd) in ("", ".") else common.fsdd_recordings(args.fsdd)
    tmp = Path(tempfile.mkdtemp(prefix="audiocnn-features-", dir=args.workdir))
    results: dict[str, Any] = {"repeats": args.repeats, "datasets": {}, "set": args.set}
    if args.warm_memory > 0:
        results["warm_memory"] = {"gigabytes": args.warm_memory, "seconds": common.warm_memory(args.warm_memory)}
    try:
        if fsdd is not None:
            results["datasets"]["FSDD"] = measure(
                "FSDD", tmp / "fsdd", common.set_params(common.fsdd_params(fsdd), args.set), args)
        if args.synthetic:
            lo, hi, rate = args.synthetic_shape
            source = common.synthetic_clips(tmp / "synthetic-source", args.synthetic, rate=rate, seconds=(lo, hi))
            results["datasets"][common.synthetic_name(args.synthetic, args.synthetic_shape)] = measure(
                "synthetic", tmp / "synthetic",
                common.set_params(common.folders_params(source, args.front_end), args.set), args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"] = common.machine()
    common.write_results(args.out, "features", results, markdown(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
