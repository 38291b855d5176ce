"""The ``audiocnn`` command: ``audiocnn predict PATH...`` classifies recordings with a trained model;
``audiocnn speak OUT`` writes spoken words in many synthetic voices (``audiocnn.speechsynth``).

Output of predict (``--format``): ``json``, one object per file (or per window with ``--stream``) on
its own line; ``csv``, a header then one row per file (and per window and event with
``--timeline``); ``table``, aligned lines for people. The default is ``table`` when stdout
is a terminal and ``json`` otherwise (pipes and files get machine-readable output).
A file is preprocessed as the pipeline preprocesses a clip (loudness normalized as a whole)
and its result is the mean over the model's windows, as evaluate computes it. With
``--stream`` each window is normalized on its own, so the same audio can score slightly
differently than inside a file. Exit status: 0 all files predicted; 1 some file failed (each
named on stderr, the others still predicted); 2 usage errors (bad options, missing model).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from audiocnn import logs, timeline
from audiocnn.config import ParamsError
from audiocnn.errors import DataError

log = logging.getLogger(__name__)

CSV_COLUMNS = ["path", "kind", "start_s", "end_s", "label", "probability", "top"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audiocnn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("predict", help="classify audio files, folders or a live PCM stream",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="audio files, or folders searched recursively for wav/flac/ogg/mp3")
    p.add_argument("--model", type=Path, default=Path("models"),
                   help="model directory (model.keras, labels.json, preprocess.json) or an exported .tflite "
                        "with export.json beside it (default: models)")
    p.add_argument("--format", choices=("json", "csv", "table"), default=None,
                   help="output format (default: table on a terminal, else json)")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per result (default: 3)")
    p.add_argument("--window", type=float, default=None,
                   help="window seconds; must equal the model's input length (preprocess.json window_seconds)")
    p.add_argument("--hop", type=float, default=None,
                   help="seconds between window starts (default: the model's export.json hop_seconds, else "
                        "evaluate.hop_seconds in --params, else half the window)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="params file read for evaluate.hop_seconds when the model stores no hop")
    p.add_argument("--timeline", action="store_true",
                   help="also report each window and the events (consecutive windows with the same label)")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="report only windows/events whose (target or top) class probability is >= P; "
                        "implies --timeline")
    p.add_argument("--target", default=None, metavar="LABEL",
                   help="report windows/events where LABEL's probability is >= --threshold (default 0.5); "
                        "implies --timeline")
    p.add_argument("--stream", action="store_true",
                   help="read raw 16-bit little-endian PCM from stdin; one result per window as it completes")
    p.add_argument("--rate", type=int, default=None, help="--stream sample rate, Hz (default: the model's)")
    p.add_argument("--channels", type=int, default=1, help="--stream channels, interleaved (default: 1)")
    p.set_defaults(handler=predict_command, subparser=p)
    s = commands.add_parser("speak", help="synthesize spoken words in many voices (espeak-ng, flite) for training",
                            description="Write every word spoken by --voices synthetic voices (espeak-ng accents and "
                                        "voice variants, or flite voices, with pitches, rates and sizes drawn from "
                                        "--seed) as OUT/{label}_{group}_{index}.wav: more voices for a small speech "
                                        "dataset. Use them for training only (a fold or group of their own).")
    s.add_argument("out", type=Path, metavar="OUT", help="folder to write the WAVs into")
    s.add_argument("--words", default="digits",
                   help="'digits' (labels 0-9 spoken as zero..nine) or LABEL=TEXT pairs, comma-separated")
    s.add_argument("--synthesizer", default="espeak",
                   help="synthesizer: espeak (espeak-ng), flite or festival (its ked voice) (default: espeak)")
    s.add_argument("--voices", type=int, default=64, help="synthetic voices (default: 64)")
    s.add_argument("--takes", type=int, default=1, help="speaking rates per voice (default: 1)")
    s.add_argument("--rate", type=int, default=8000, help="sample rate of the files, Hz (default: 8000)")
    s.add_argument("--seed", type=int, default=0, help="draws the voices (default: 0)")
    s.add_argument("--group", default="", help="the middle part of every file name (default: the synthesizer's name)")
    s.set_defaults(handler=speak_command, subparser=s)
    return parser


def speak_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from audiocnn import speechsynth

    if min(args.voices, args.takes, args.rate) < 1:
        parser.error("--voices, --takes and --rate must be positive")
    if args.synthesizer not in speechsynth.SYNTHESIZERS:  # not argparse choices: parsing must not import speechsynth
        parser.error(f"--synthesizer: {args.synthesizer!r} is not one of {', '.join(speechsynth.SYNTHESIZERS)}")
    try:
        words = speechsynth.words_from(args.words)
    except ValueError as err:
        parser.error(str(err))
    try:
        written = speechsynth.write_words(args.out, words, args.voices, args.takes, args.rate, args.seed, args.group,
                                           args.synthesizer)
    except (DataError, OSError) as err:
        print(f"audiocnn speak: error: {err}", file=sys.stderr)
        return 1
    print(f"{written} clips in {args.out}")
    return 0


def top_list(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict[str, Any]]:
    return [{"label": label, "probability": p} for label, p in timeline.top_k(probs, labels, k)]


def short_top(top: list[dict[str, Any]]) -> str:
    return ";".join(f"{t['label']}:{t['probability']:.4f}" for t in top)


class Writer:
    """Results to ``out`` as json lines, csv rows or a table; one flush per result."""

    def __init__(self, fmt: str, out: TextIO, labels: Sequence[str]) -> None:
        self.fmt, self.out = fmt, out
        self.width = max(len(label) for label in labels)
        self.csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self.csv:
            self.csv.writerow(CSV_COLUMNS)

    def file(self, result: dict[str, Any]) -> None:
        if self.fmt == "json":
            self.out.write(json.dumps(result, ensure_ascii=False) + "\n")
        elif self.csv:
            self.csv.writerow([result["path"], "file", 0.0, round(result["duration_s"], 3), result["label"],
                               result["probability"], short_top(result["top"])])
            for w in result.get("timeline", []):
                self.csv.writerow([result["path"], "window", w["start_s"], w["end_s"], w["label"], w["probability"],
                                   ""])
            for e in result.get("events", []):
                self.csv.writerow([result["path"], "event", e["start_s"], e["end_s"], e["label"], e["probability"], ""])
        else:
            others = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in result["top"][1:])
            self.out.write(f"{result['label']:<{self.width}}  {result['probability']:.2f}  {result['path']}"
                           f"{f'  ({others})' if others else ''}\n")
            for w in result.get("timeline", []):
                span = f"{w['start_s']:.2f}-{w['end_s']:.2f} s"
                self.out.write(f"    {span:<18}{w['label']:<{self.width}}  {w['probability']:.2f}\n")
            for e in result.get("events", []):
                self.out.write(f"  event: {e['label']} {e['start_s']:.2f}-{e['end_s']:.2f} s, "
                               f"p={e['probability']:.2f} ({e['windows']} window{'s' * (e['windows'] != 1)})\n")
        self.out.flush()

    def window(self, result: dict[str, Any]) -> None:
        """One stream window."""
        if self.fmt == "json":
            self.out.write(json.dumps(result, ensure_ascii=False) + "\n")
        elif self.csv:
            self.csv.writerow(["-", "window", result["start_s"], result["end_s"], result["label"],
                               result["probability"], short_top(result["top"])])
        else:
            others = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in result["top"][1:])
            span = f"{result['start_s']:.2f}-{result['end_s']:.2f} s"
            self.out.write(f"{span:<20}{result['label']:<{self.width}}  "
                           f"{result['probability']:.2f}{f'  ({others})' if others else ''}\n")
        self.out.flush()


def file_result(path: Path, prediction: Any, labels: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    top = top_list(prediction.probabilities, labels, args.top_k)
    result = {"path": str(path), "label": top[0]["label"], "probability": top[0]["probability"], "top": top,
              "duration_s": prediction.duration_s, "windows": len(prediction.starts_s)}
    if args.timeline:
        windows = timeline.label_windows(prediction.window_probabilities, prediction.starts_s, prediction.ends_s,
                                         labels, args.threshold, args.target)
        result["timeline"] = [{"start_s": w.start_s, "end_s": w.end_s, "label": w.label,
                               "probability": w.probability} for w in windows]
        result["events"] = [vars(e) for e in timeline.merge_events(windows)]
    return result


def run_files(model: Any, args: argparse.Namespace, writer: Writer, hop_s: float) -> int:
    from audiocnn import predict

    failed = 0
    for given in args.paths:
        try:
            files = predict.find_audio(given)
        except DataError as err:
            print(f"audiocnn predict: error: {err}", file=sys.stderr)
            failed += 1
            continue
        for path in files:
            try:
                prediction = predict.predict_file(model, path, hop_s)
            except (DataError, OSError, ValueError) as err:  # named, counted, the other files go on
                print(f"audiocnn predict: error: {err if str(path) in str(err) else f'{path}: {err}'}",
                      file=sys.stderr)
                failed += 1
                continue
            writer.file(file_result(path, prediction, model.labels, args))
    return 1 if failed else 0


def run_stream(model: Any, args: argparse.Namespace, writer: Writer, hop_s: float) -> int:
    from audiocnn import stream

    rate = args.rate or model.pre.sample_rate
    for w in stream.stream_windows(model, sys.stdin.buffer, rate, args.channels, hop_s):
        top = top_list(w.probabilities, model.labels, args.top_k)
        kept = timeline.label_windows(w.probabilities[np.newaxis], [w.start_s], [w.end_s], model.labels,
                                      args.threshold, args.target)
        if kept:
            writer.window({"index": w.index, "start_s": w.start_s, "end_s": w.end_s, "label": kept[0].label,
                           "probability": kept[0].probability, "top": top})
    return 0


def predict_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.stream == bool(args.paths):
        parser.error("give PATH arguments, or --stream to read PCM from stdin (not both)")
    if args.top_k < 1 or (args.hop is not None and args.hop <= 0) or args.channels < 1 or (args.rate or 1) < 1:
        parser.error("--top-k, --hop, --rate and --channels must be positive")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold:g} must be within 0..1")
    args.timeline = args.timeline or args.threshold is not None or args.target is not None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported: no C++ info lines
    from audiocnn import predict

    try:
        model = predict.load_model(args.model)
        predict.window_seconds_check(model, args.window)
    except (DataError, ParamsError) as err:
        print(f"audiocnn predict: error: {err}", file=sys.stderr)
        return 2
    if args.target is not None and args.target not in model.labels:
        parser.error(f"--target {args.target!r} is not a model label ({', '.join(model.labels)})")
    hop_s = args.hop if args.hop is not None else predict.default_hop_seconds(model, args.params)
    fmt = args.format or ("table" if sys.stdout.isatty() else "json")
    writer = Writer(fmt, sys.stdout, model.labels)
    return (run_stream if args.stream else run_files)(model, args, writer, hop_s)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``audiocnn`` console script; returns the exit status."""
    logs.setup(os.environ.get("AUDIOCNN_LOG_LEVEL", "WARNING"))
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args, args.subparser)
    except BrokenPipeError:  # e.g. `audiocnn predict ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt:  # Ctrl-C ends a --stream session
        return 130


if __name__ == "__main__":
    sys.exit(main())
