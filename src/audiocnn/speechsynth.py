"""Spoken words from many synthetic voices (espeak-ng, flite, festival), to add voices to a small speech dataset.

A speech model that hears few speakers learns their voices along with the words: on FSDD
(six speakers) the accuracy on an unheard voice climbs with every training voice (see
benchmarks/RESULTS.md). Two synthesizers packaged by every Linux distribution make the voices:
espeak-ng, a formant synthesizer, speaks any word in dozens of accents and voice variants at
any pitch and rate; flite speaks with four voices built from recordings of real people (kal,
awb, rms, slt), each drawn here with its own pitch, speaking rate and vocal-tract size (the
clip played faster or slower, which moves pitch and formants together as a smaller or larger
speaker would); festival speaks with ked, a US male diphone voice recorded from a real speaker
(Debian package festvox-kdlpc16k), drawn the same way. Each drawn combination is one synthetic
"speaker". The clips are meant for training only: put them in a fold or group of their own,
never in a test set.

Files are named ``{label}_{group}_{index}.wav`` (FSDD's ``{digit}_{speaker}_{index}.wav``), so
an ``ingest.layout: pattern`` with ``(?P<label>..)_(?P<fold>..)_..`` reads them with the data.
The same ``seed`` gives the same voices, hence the same files.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

import numpy as np

from audiocnn import fileio
from audiocnn.errors import DataError

log = logging.getLogger(__name__)

SYNTHESIZERS = {"espeak": "espeak-ng", "flite": "flite", "festival": "text2wave"}  # name -> program
PACKAGES = {"espeak": "espeak-ng", "flite": "flite", "festival": "festival festvox-kdlpc16k"}  # Debian/Ubuntu packages
DIGITS = {str(d): word for d, word in enumerate("zero one two three four five six seven eight nine".split())}
# espeak-ng's English accents (voices/gmw) and voice variants (voices/!v) that speak clearly
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = (tuple(f"m{i}" for i in range(1, 9)) + tuple(f"f{i}" for i in range(1, 6))
            + ("klatt", "klatt2", "klatt3", "klatt4", "klatt6", "Alex", "Andy", "Annie", "adam", "anika", "aunty",
               "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "grandma", "grandpa", "iven", "john",
               "linda", "max", "michel", "norbert", "paul", "pedro", "robert", "steph", "victor"))
PITCH = (20, 80)  # espeak-ng -p range drawn per voice (0-99, default 50)
SPEED = (120, 200)  # espeak-ng words per minute drawn per take (default 175)
# flite's built-in English voices: kal16 (US male, diphones), awb (Scottish male), rms (US male), slt (US
# female), the last three statistical voices of CMU ARCTIC speakers; awb_time only speaks times, kal is kal16 at 8 kHz
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
F0_SHIFT = (0.75, 1.5)  # flite f0_shift (pitch factor) drawn per voice; rms keeps its pitch, its size still moves it
STRETCH = (0.8, 1.3)  # flite duration_stretch (> 1 slower) drawn per take
SIZE = (0.87, 1.15)  # playback-rate factor drawn per flite or festival voice: pitch and formants x size, duration / size
# festival's English voices recorded from a speaker not among flite's: name -> its intonation model's
# target F0 mean and standard deviation in Hz (festvox/<voice>.scm), both scaled by the drawn pitch factor
FESTIVAL_VOICES = {"ked_diphone": (105.0, 15.0)}
TRIM_FRACTION = 0.01  # samples below 1% of the peak at either end are silence
MARGIN_SECONDS = 0.01  # kept before the first and after the last loud sample


def missing(synthesizer: str) -> str:
    """The message for a synthesizer whose program is not on PATH."""
    return (f"{SYNTHESIZERS[synthesizer]} not found on PATH: install it "
            f"(Debian/Ubuntu: apt-get install {PACKAGES[synthesizer]})")


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker of ``synthesizer``; ``speeds``: one speaking rate per take.

    espeak: ``name`` accent+variant, ``pitch`` -p (0-99), speeds in words per minute;
    flite: ``name`` a flite voice, ``pitch`` its f0_shift factor, speeds duration_stretch factors;
    festival: ``name`` a festival voice, ``pitch`` the factor on its F0 targets, speeds Duration_Stretch factors.
    ``size``: the clip is resampled as if recorded at ``size`` times its rate (1.0: unchanged).
    """

    synthesizer: str
    name: str
    pitch: float
    speeds: tuple[float, ...]
    size: float = 1.0

    def command(self, text: str, speed: float, out: str = "/dev/stdout") -> list[str]:
        """The synthesizer's command line writing a WAV of ``text`` to ``out`` (festival: reads ``text`` on stdin).

        espeak-ng and flite write to stdout; festival's text2wave needs a file it can seek in
        (through a pipe its WAV header says 0 samples).
        """
        if self.synthesizer == "espeak":
            return [SYNTHESIZERS["espeak"], "-v", self.name, "-p", str(self.pitch), "-s", str(speed), "--stdout", text]
        if self.synthesizer == "festival":
            f0_mean, f0_std = FESTIVAL_VOICES[self.name]
            return [SYNTHESIZERS["festival"], "-eval", f"(voice_{self.name})",
                    "-eval", f"(set! int_lr_params '((target_f0_mean {f0_mean * self.pitch:.1f}) (target_f0_std "
                             f"{f0_std * self.pitch:.1f}) (model_f0_mean 170) (model_f0_std 34)))",
                    "-eval", f"(Parameter.set 'Duration_Stretch {speed:.3f})", "-o", out]
        return [SYNTHESIZERS["flite"], "-voice", self.name, "-t", text, "-o", out,
                "--setf", f"f0_shift={self.pitch:.3f}", "--setf", f"duration_stretch={speed:.3f}"]


def words_from(spec: Union[str, Mapping[str, str]]) -> dict[str, str]:
    """{label: text} from ``"digits"`` (labels 0-9 spoken as zero..nine), ``"LABEL=TEXT,..."`` or a mapping.

    ValueError names a malformed pair.
    """
    if not isinstance(spec, str):
        return {str(label): str(text) for label, text in dict(spec).items()}
    if spec.strip() == "digits":
        return dict(DIGITS)
    words = {}
    for pair in filter(None, (part.strip() for part in spec.split(","))):
        label, sep, spoken = pair.partition("=")
        if not sep or not label.strip() or not spoken.strip():
            raise ValueError(f"--words: {pair!r} is not LABEL=TEXT")
        words[label.strip()] = spoken.strip()
    if not words:
        raise ValueError("--words: no LABEL=TEXT pairs")
    return words


def draw_voices(count: int, takes: int, seed: int, synthesizer: str = "espeak") -> list[Voice]:
    """``count`` voices of ``synthesizer``, each with ``takes`` speaking rates, drawn from ``seed``."""
    if count < 1 or takes < 1:
        raise ValueError(f"voices={count} and takes={takes} must be >= 1")
    if synthesizer not in SYNTHESIZERS:
        raise ValueError(f"synthesizer {synthesizer!r}: expected one of {', '.join(SYNTHESIZERS)}")
    rng = np.random.default_rng(seed)
    voices = []
    for _ in range(count):
        if synthesizer == "espeak":
            accent, variant = ACCENTS[rng.integers(len(ACCENTS))], VARIANTS[rng.integers(len(VARIANTS))]
            pitch = int(rng.integers(*PITCH))
            speeds = tuple(int(rng.integers(*SPEED)) for _ in range(takes))
            voices.append(Voice(synthesizer, f"{accent}+{variant}", pitch, speeds))
        else:
            names = FLITE_VOICES if synthesizer == "flite" else tuple(FESTIVAL_VOICES)
            name, f0_shift = names[rng.integers(len(names))], float(rng.uniform(*F0_SHIFT))
            speeds = tuple(float(rng.uniform(*STRETCH)) for _ in range(takes))
            voices.append(Voice(synthesizer, name, f0_shift, speeds, size=float(rng.uniform(*SIZE))))
    return voices


def speak(text: str, voice: Voice, speed: float, sample_rate: int) -> np.ndarray:
    """(samples,) float32 at ``sample_rate``: ``text`` spoken by ``voice``, silence trimmed at both ends."""
    import soundfile as sf
    import soxr

    if voice.synthesizer == "festival":  # text on stdin, the WAV into a file of its own
        with tempfile.TemporaryDirectory(prefix="audiocnn-speak-") as tmp:
            out = Path(tmp) / "speech.wav"
            command = voice.command(text, speed, str(out))
            done = _run(command, voice.synthesizer, stdin=text.encode())
            data = out.read_bytes() if out.exists() else b""
    else:
        command = voice.command(text, speed)
        done = _run(command, voice.synthesizer)
        data = done.stdout
    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32")  # (samples,) or (samples, channels)
    except Exception as err:  # noqa: BLE001  (soundfile raises its own types for unreadable data)
        # (festival exits 0 when a voice is missing: its message is on stderr)
        raise DataError(f"{' '.join(command)}: output is not audio ({err}); stderr: "
                        f"{done.stderr.decode(errors='replace')[-300:].strip() or '(empty)'}") from None
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    played_at = rate * voice.size if voice.size != 1.0 else rate  # Hz the samples are taken to be at
    audio = soxr.resample(audio, played_at, sample_rate) if played_at != sample_rate else audio
    return trim(np.asarray(audio, dtype=np.float32), round(MARGIN_SECONDS * sample_rate))


def _run(command: list[str], synthesizer: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a synthesizer's ``command``; DataError when it is missing or fails (its stderr in the message)."""
    try:
        return subprocess.run(command, input=stdin, capture_output=True, check=True)
    except FileNotFoundError:
        raise DataError(missing(synthesizer)) from None
    except subprocess.CalledProcessError as err:
        raise DataError(f"{' '.join(command)} failed ({err.returncode}): {err.stderr.decode(errors='replace')[-300:]}"
                        ) from None


def trim(audio: np.ndarray, margin: int) -> np.ndarray:
    """(samples,) -> ``audio[first - margin : last + margin]`` (end exclusive), first and last being the
    samples above ``TRIM_FRACTION`` of the peak; empty when the clip is silent."""
    loud = np.flatnonzero(np.abs(audio) > np.abs(audio).max(initial=0.0) * TRIM_FRACTION)
    if loud.size == 0:
        return audio[:0]
    return audio[max(0, loud[0] - margin): loud[-1] + margin]


def write_words(out: Path, words: Mapping[str, str], voices: int, takes: int = 1, sample_rate: int = 8000,
                seed: int = 0, group: str = "", synthesizer: str = "espeak") -> int:
    """Every word of ``words`` (label -> text) by every drawn voice and take, as 16-bit WAVs in ``out``.

    Files are ``{label}_{group}_{voice * takes + take}.wav`` (group "" = the synthesizer's name),
    each written atomically; returns how many were written (a silent synthesis is skipped with a warning).
    """
    import soundfile as sf

    group = group or synthesizer
    if synthesizer not in SYNTHESIZERS:
        raise DataError(f"synthesizer {synthesizer!r}: expected one of {', '.join(SYNTHESIZERS)}")
    if shutil.which(SYNTHESIZERS[synthesizer]) is None:
        raise DataError(missing(synthesizer))
    if not words:
        raise DataError("no words to speak")
    for kind, name in [*(("label", label) for label in words), ("group", group)]:
        if "_" in name or "/" in name or not name:  # either would split or misplace the file name's parts
            raise DataError(f"{kind} {name!r}: must be non-empty, without '_' or '/' (it is part of the file name)")
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for v, voice in enumerate(draw_voices(voices, takes, seed, synthesizer)):
        for t, speed in enumerate(voice.speeds):
            for label, text in words.items():
                audio = speak(text, voice, speed, sample_rate)  # (samples,) float32
                path = out / f"{label}_{group}_{v * takes + t}.wav"
                if audio.size == 0:
                    log.warning("%s: %s said %r in silence; skipped", path, voice.name, text)
                    continue
                with fileio.atomic_path(path) as tmp:
                    sf.write(tmp, audio, sample_rate, subtype="PCM_16", format="WAV")
                written += 1
    log.info("%d clips of %d words by %d %s voices x %d takes in %s", written, len(words), voices, synthesizer, takes,
             out)
    return written
