"""Peak resident memory of every stage at two data sizes: memory must not grow with the number of clips.

    python benchmarks/memory.py [--sizes 3000,30000] [--train] [--seconds 0.3,0.6]

For each size, generated clips (FSDD-sized by default; ``--seconds`` sets their length range; a
temporary folder) go through the stage scripts
(ingest, normalize, spectrogram, split; with ``--train`` also train and evaluate, 1 epoch),
each a subprocess timed with ``os.wait4``: its ru_maxrss is the peak RSS of the stage process
and of its pool workers (the largest one). Target: the largest size within 1.5x of the smallest.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATA_STAGES = ["ingest", "normalize", "spectrogram", "split"]
TARGET_RATIO = 1.5


def run_size(root: Path, clips: int, train: bool, workers: int,
             seconds: tuple[float, float] = (0.3, 0.6)) -> dict[str, Any]:
    source = common.synthetic_clips(root / "source", clips, seed=clips, seconds=seconds)
    params = common.folders_params(source, train={"epochs": 1, "warmup_epochs": 0, "patience": 1},
                                   normalize={"workers": workers}, spectrogram={"workers": workers})
    path = common.write_params(root / "params.yaml", params)
    env = common.tool_env(AUDIOCNN_CACHE_DIR="off", MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    stages = DATA_STAGES + (["train", "evaluate"] if train else [])
    results = {}
    for stage in stages:
        result = common.timed(common.stage_cmd(stage, path, root), root, env)
        result.pop("output")
        results[stage] = result
        print(f"[{clips}] {stage}: {result}", file=sys.stderr, flush=True)
    return results


def markdown(results: dict[str, Any], command: str) -> list[str]:
    lines = common.header("Peak memory per stage vs data size", command, results["machine"])
    sizes = sorted(results["sizes"], key=int)
    small, large = sizes[0], sizes[-1]
    rows = []
    for stage in results["sizes"][small]:
        cells = [stage]
        for size in sizes:
            r = results["sizes"][size][stage]
            cells += [f"{r['peak_rss_mib']:.0f}", f"{r['seconds']:.1f}"]
        ratio = results["sizes"][large][stage]["peak_rss_mib"] / results["sizes"][small][stage]["peak_rss_mib"]
        cells += [f"{ratio:.2f}x", "yes" if ratio <= TARGET_RATIO else "**no**"]
        rows.append(cells)
    columns = ["stage"] + [c for size in sizes for c in (f"{size} clips: peak MiB", f"{size} clips: s")]
    lines += common.table(columns + [f"peak {large}/{small}", f"<= {TARGET_RATIO}x"], rows)
    lines += ["", "Peak RSS from os.wait4 of the stage subprocess (max over it and its pool workers); "
              f"feature cache off; generated clips of {results.get('seconds', [0.3, 0.6])[0]:g}-"
              f"{results.get('seconds', [0.3, 0.6])[1]:g} s, FSDD front end (8 kHz, 40 mels, PNGs on)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: [int(n) for n in s.split(",")], default=[3000, 30000])
    parser.add_argument("--train", action="store_true", help="also train (1 epoch) and evaluate")
    parser.add_argument("--workers", type=int, default=0, help="normalize/spectrogram workers (0 = all cores)")
    parser.add_argument("--seconds", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.3, 0.6),
                        help="generated clips' length range LO,HI in seconds (default FSDD-sized)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results" / "memory")
    args = parser.parse_args(argv)
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {"sizes": {}, "seconds": list(args.seconds)}
    for clips in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"audiocnn-memory-{clips}-", dir=args.workdir))
        try:
            results["sizes"][str(clips)] = run_size(tmp, clips, args.train, args.workers, args.seconds)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    results["machine"] = common.machine()
    common.write_results(args.out, "memory", results, markdown(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
