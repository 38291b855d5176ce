"""Helpers shared by the benchmark runners: machine facts, timed stage subprocesses, synthetic clips, tables.

Benchmarks are measurements, not tests: each runner prints a Markdown table and writes it with
the raw numbers (results.json) under its ``--out`` folder. Timings on a shared machine are
noisy: runners take the median of ``--repeats`` runs and state the load average.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
FSDD = REPO.parent / "shared" / "datasets" / "fsdd" / "recordings"


def fsdd_recordings(path: Path) -> Path:
    """``path`` resolved, or SystemExit naming it when it holds no .wav files.

    The default (``FSDD``) is relative to the checkout, so a clone elsewhere does not find it:
    a runner stops here rather than measure an empty set.
    """
    path = Path(path).resolve()
    if not path.is_dir() or next(path.glob("*.wav"), None) is None:
        raise SystemExit(f"FSDD recordings not found: {path} holds no .wav files (pass --fsdd FOLDER)")
    return path


def machine() -> dict[str, Any]:
    """Cores, CPU model, Python, load average, date: the header of every result."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def header(title: str, command: str, info: dict[str, Any]) -> list[str]:
    load = " / ".join(f"{x:.2f}" for x in info["load_average"])
    return [f"### {title}", "", f"Command: `{command}`  ",
            f"Machine: {info['cores']} cores, {info['cpu']}, Python {info['python']}; "
            f"load average (1/5/15 min) at the end: {load}  ", f"Date: {info['date']}", ""]


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def write_results(out: Path, name: str, results: dict[str, Any], markdown: list[str]) -> str:
    """results.json and results.md under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(markdown) + "\n"
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "results.md").write_text(text, encoding="utf-8")
    print(text)
    return text


def tool_env(**extra: str) -> dict[str, str]:
    """Subprocess environment: this venv first on PATH, quiet TF, no DVC analytics, git identity."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(TF_CPP_MIN_LOG_LEVEL="2", DVC_NO_ANALYTICS="1", AUDIOCNN_LOG_LEVEL="WARNING")
    for key, value in (("GIT_AUTHOR_NAME", "audiocnn bench"), ("GIT_AUTHOR_EMAIL", "bench@audiocnn.invalid")):
        env.setdefault(key, value)
        env.setdefault(key.replace("AUTHOR", "COMMITTER"), value)
    env.update(extra)
    return env


# Started from this (possibly large) process, a child's ru_maxrss would start at our own RSS (Linux
# records the old memory's peak at exec), so a small launcher runs the command and reports its rusage.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
               "cpu_seconds": usage.ru_utime + usage.ru_stime, "user_seconds": usage.ru_utime,
               "system_seconds": usage.ru_stime}, out)
"""


def timed(cmd: Sequence[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak resident memory (MiB, max over it and its children, from wait4) and
    CPU seconds of it and its children (``cpu_seconds`` = ``user_seconds`` + ``system_seconds``, the kernel's share)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        start = time.perf_counter()
        proc = subprocess.run([PYTHON, "-S", "-c", LAUNCHER, report.name, *cmd], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - start
        usage = json.loads(Path(report.name).read_text() or "{}")
    if proc.returncode != 0 or usage.get("code") != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({usage.get('code')}) in {cwd}:\n{proc.stdout[-4000:]}")
    return {"seconds": round(seconds, 3), "peak_rss_mib": round(usage["maxrss_kib"] / 1024, 1),
            "cpu_seconds": round(usage["cpu_seconds"], 2), "user_seconds": round(usage["user_seconds"], 2),
            "system_seconds": round(usage["system_seconds"], 2), "output": proc.stdout}


def warm_memory(gigabytes: float) -> float:
    """Touch ``gigabytes`` of fresh memory in a child process (freed as it exits); seconds it took.

    Some virtual machines back their memory only when the guest first touches a page: on the
    2-core Firecracker guests of RESULTS.md, 3.6 GB took 23 s to touch the first time and 0.2 s
    once touched before. A stage that writes hundreds of MB into the page cache then pays that
    cost in kernel time, or not, depending on which free pages the kernel hands it; touching
    more than the runs will use before timing them takes that luck out of the comparison.
    """
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import numpy; numpy.ones({int(gigabytes * 1e9)}, numpy.uint8)"],
                   check=True)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


FRONT_ENDS = ("fsdd", "params")  # the audio and spectrogram sections of fsdd_official.yaml, or of params.yaml
FSDD_SIZED = (0.3, 0.6, 8000)  # synthetic_clips' default shape: seconds from, to, Hz


def clip_shape(text: str) -> tuple[float, float, int]:
    """``"LO,HI,HZ"`` (seconds from, to, sample rate) -> a synthetic_clips shape; SystemExit names a bad one."""
    try:
        lo, hi, rate = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--synthetic-shape {text!r}: expected LO,HI,HZ (e.g. 1.5,4.0,22050)") from None
    if not 0 < lo < hi or rate < 1000:
        raise SystemExit(f"--synthetic-shape {text!r}: needs 0 < LO < HI seconds and HZ >= 1000")
    return lo, hi, int(rate)


def shape_note(shape: tuple[float, float, int]) -> str:
    """" (LO-HI s at HZ Hz)" for a generated set's name, "" for the FSDD-sized default."""
    return "" if tuple(shape) == FSDD_SIZED else f" ({shape[0]:g}-{shape[1]:g} s at {shape[2]} Hz)"


def synthetic_name(clips: int, shape: tuple[float, float, int] = FSDD_SIZED) -> str:
    """A generated set's name in result tables: "synthetic N", with its shape when not FSDD-sized."""
    return f"synthetic {clips}{shape_note(shape)}"


def fsdd_params(source: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """params.yaml with benchmarks/configs/fsdd_official.yaml's overrides (8 kHz front end) and ``source``."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from pipeline import deep_merge  # noqa: E402  (benchmarks/pipeline.py: one merge rule for configs)

    base = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    config = yaml.safe_load((REPO / "benchmarks" / "configs" / "fsdd_official.yaml").read_text(encoding="utf-8"))
    params = deep_merge(base, config["overrides"])
    params["ingest"]["source"] = str(source)
    params["train"]["augment"]["noise_class"] = ""  # no background class in FSDD or the generated sets
    return deep_merge(params, sections)


def folders_params(source: Path, front_end: str = "fsdd", **sections: dict[str, Any]) -> dict[str, Any]:
    """A folders-layout source (the synthetic sets) with FSDD's front end, or with params.yaml's ("params")."""
    if front_end not in FRONT_ENDS:
        raise SystemExit(f"front end {front_end!r}: expected one of {', '.join(FRONT_ENDS)}")
    params = fsdd_params(source, **sections)
    if front_end == "params":
        base = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        params["audio"], params["spectrogram"] = base["audio"], base["spectrogram"]
    params["ingest"].update(layout="folders", pattern="")
    params["split"].update(strategy="stratified", test_folds=[], val_folds=[])
    return params


def set_params(params: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """``params`` with dotted ``key=value`` assignments applied (values parsed as YAML), as ``dvc exp run -S`` does."""
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        *parents, leaf = key.split(".")
        section = params
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
            if section is None:
                break
        if not sep or section is None or not isinstance(section, dict) or leaf not in section:
            raise SystemExit(f"--set {assignment}: expected KEY=VALUE with KEY a dotted params key (e.g. "
                             "spectrogram.images=false)")
        section[leaf] = yaml.safe_load(value)
    return params


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def synthetic_clips(root: Path, clips: int, seed: int = 0, classes: int = 10, rate: int = 8000,
                    seconds: tuple[float, float] = (0.3, 0.6)) -> Path:
    """``clips`` short 16-bit mono WAVs in ``root/<class>/`` (folders layout): a class tone + noise + gain.

    Cheap to make (about 0.1 ms of compute per clip) and about FSDD's size (0.3-0.6 s at 8 kHz).
    """
    import soundfile as sf

    rng = np.random.default_rng(seed)
    names = [f"class{c:02d}" for c in range(classes)]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    lengths = rng.integers(int(seconds[0] * rate), int(seconds[1] * rate), clips)
    t = np.arange(int(seconds[1] * rate)) / rate
    for i, n in enumerate(lengths):
        c = i % classes
        tone = np.sin(2 * np.pi * (200 + 150 * c) * t[:n] + rng.uniform(0, 6.3))
        x = rng.uniform(0.05, 0.5) * tone + 0.01 * rng.standard_normal(n)
        sf.write(root / names[c] / f"{names[c]}_{i:06d}.wav", x.astype(np.float32), rate, subtype="PCM_16")
    return root


def stage_cmd(stage: str, params: Path, root: Path) -> list[str]:
    """The command of one data stage on a workspace folder, with the paths dvc.yaml uses."""
    source = yaml.safe_load(params.read_text(encoding="utf-8"))["ingest"]["source"]
    script = [PYTHON, str(REPO / "stages" / f"{stage}.py"), "--params", str(params)]
    args = {
        "ingest": ["--source", source, "--manifest", "dataset/ingest/manifest.csv",
                   "--rejected", "dataset/ingest/rejected.csv", "--metrics", "metrics/ingest.json"],
        "normalize": ["--source", source, "--manifest", "dataset/ingest/manifest.csv", "--out", "dataset/normalize"],
        "spectrogram": ["--normalized", "dataset/normalize", "--features", "dataset/features",
                        "--images", "dataset/spectrograms", "--gallery", "reports/gallery.png"],
        "split": ["--features", "dataset/features", "--out", "dataset/split", "--metrics", "metrics/split.json"],
        "train": ["--features", "dataset/features", "--images", "dataset/spectrograms", "--split", "dataset/split",
                  "--model", "models", "--metrics", "metrics/train.json", "--history", "reports/train/history.csv",
                  "--curves", "reports/train/curves.png"],
        "evaluate": ["--features", "dataset/features", "--images", "dataset/spectrograms", "--split", "dataset/split",
                     "--model", "models", "--metrics", "metrics/eval.json", "--reports", "reports/eval"],
    }[stage]
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    (root / "reports").mkdir(parents=True, exist_ok=True)
    return script + args
