"""Synthetic spoken words (audiocnn.speechsynth, `audiocnn speak`): voices, names, trimming, errors.

Most tests put stand-ins for ``espeak-ng``, ``flite`` and festival's ``text2wave`` on PATH (a script that writes a tone
whose pitch and length follow the pitch and rate options), so they run without the
synthesizers; two tests use the real ones where they are installed (CI installs them).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiocnn import cli, speechsynth
from audiocnn.errors import DataError

FAKE_SYNTHESIZER = f"""#!{sys.executable}
import io, os, sys
import numpy as np, soundfile as sf
args = sys.argv[1:]
if os.path.basename(sys.argv[0]) == "flite":  # flite -voice V -t TEXT -o /dev/stdout --setf f0_shift=F --setf ...=S
    text, rate = args[args.index("-t") + 1], 16000
    setf = dict(args[i + 1].split("=") for i, a in enumerate(args) if a == "--setf")
    hz, seconds = 200 * float(setf["f0_shift"]), 0.1 * float(setf["duration_stretch"]) * len(text)
elif os.path.basename(sys.argv[0]) == "text2wave":  # text2wave -eval (voice_V) -eval (set! int_lr_params ..) ... -o F
    text, rate, evals = sys.stdin.read().strip(), 16000, [args[i + 1] for i, a in enumerate(args) if a == "-eval"]
    if evals[0] != "(voice_ked_diphone)":
        sys.stderr.write("SIOD ERROR: unbound variable : " + evals[0][1:-1])
        sys.exit(0)  # as festival does
    hz = float(evals[1].split("target_f0_mean ")[1].split(")")[0])
    seconds = 0.1 * float(evals[2].split("Duration_Stretch ")[1].rstrip(")")) * len(text)
else:  # espeak-ng -v V -p P -s S --stdout TEXT
    text, rate = args[-1], 22050
    pitch, speed = int(args[args.index("-p") + 1]), int(args[args.index("-s") + 1])
    hz, seconds = 100 + 5 * pitch, 60.0 / speed * len(text) / 4
if text == "fail":
    sys.stderr.write("voice not found")
    sys.exit(1)
with open(sys.argv[0] + ".log", "a") as log:
    log.write(" ".join(args) + "\\n")
t = np.arange(int(rate * seconds)) / rate
tone = 0.0 if text == "silence" else 0.5 * np.sin(2 * np.pi * hz * t)
audio = np.concatenate([np.zeros(rate // 10), np.zeros_like(t) + tone, np.zeros(rate // 5)]).astype(np.float32)
buffer = io.BytesIO()
sf.write(buffer, audio, rate, format="WAV", subtype="PCM_16")
if "-o" in args and args[args.index("-o") + 1] != "/dev/stdout":
    open(args[args.index("-o") + 1], "wb").write(buffer.getvalue())
else:
    sys.stdout.buffer.write(buffer.getvalue())
"""


def fake_program(tmp_path: Path, monkeypatch, name: str) -> Path:
    """A stand-in synthesizer ``name`` first on PATH; returns its call log (one line of arguments per call)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(FAKE_SYNTHESIZER)
    script.chmod(0o755)
    if str(bin_dir) not in os.environ["PATH"]:
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return Path(f"{script}.log")


@pytest.fixture
def fake_espeak(tmp_path, monkeypatch) -> Path:
    """A stand-in espeak-ng first on PATH; returns its call log."""
    return fake_program(tmp_path, monkeypatch, "espeak-ng")


@pytest.fixture
def fake_flite(tmp_path, monkeypatch) -> Path:
    """A stand-in flite first on PATH; returns its call log."""
    return fake_program(tmp_path, monkeypatch, "flite")


@pytest.fixture
def fake_festival(tmp_path, monkeypatch) -> Path:
    """A stand-in text2wave first on PATH (text on stdin, WAV to the -o file); returns its call log."""
    return fake_program(tmp_path, monkeypatch, "text2wave")


def dominant_hz(audio: np.ndarray, rate: int) -> float:
    """The frequency of the strongest FFT bin of (samples,) audio."""
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[spectrum.argmax()])


def test_voices_are_drawn_from_the_seed_within_the_ranges():
    voices = speechsynth.draw_voices(50, 2, seed=3)
    assert voices == speechsynth.draw_voices(50, 2, seed=3)
    assert voices != speechsynth.draw_voices(50, 2, seed=4)
    assert all(v.synthesizer == "espeak" and v.size == 1.0 for v in voices)
    assert all(v.name.split("+")[0] in speechsynth.ACCENTS and v.name.split("+")[1] in speechsynth.VARIANTS
               for v in voices)
    assert all(speechsynth.PITCH[0] <= v.pitch < speechsynth.PITCH[1] and len(v.speeds) == 2 for v in voices)
    assert all(speechsynth.SPEED[0] <= s < speechsynth.SPEED[1] for v in voices for s in v.speeds)
    assert len({(v.name, v.pitch) for v in voices}) > 40  # distinct speakers, not one voice repeated
    with pytest.raises(ValueError, match="voices=0"):
        speechsynth.draw_voices(0, 1, seed=0)
    with pytest.raises(ValueError, match="synthesizer 'sam'"):
        speechsynth.draw_voices(1, 1, seed=0, synthesizer="sam")


def test_flite_voices_draw_a_voice_pitch_rate_and_size_within_the_ranges():
    voices = speechsynth.draw_voices(50, 3, seed=3, synthesizer="flite")
    assert voices == speechsynth.draw_voices(50, 3, seed=3, synthesizer="flite")
    assert {v.name for v in voices} == set(speechsynth.FLITE_VOICES) and all(v.synthesizer == "flite" for v in voices)
    assert all(speechsynth.F0_SHIFT[0] <= v.pitch < speechsynth.F0_SHIFT[1] for v in voices)
    assert all(speechsynth.SIZE[0] <= v.size < speechsynth.SIZE[1] for v in voices)
    assert all(len(v.speeds) == 3 and all(speechsynth.STRETCH[0] <= s < speechsynth.STRETCH[1] for s in v.speeds)
               for v in voices)
    assert voices[0].command("one", 1.25) == ["flite", "-voice", voices[0].name, "-t", "one", "-o", "/dev/stdout",
                                              "--setf", f"f0_shift={voices[0].pitch:.3f}",
                                              "--setf", "duration_stretch=1.250"]


def test_flite_clips_take_the_voice_size_as_a_pitch_and_formant_factor(tmp_path, fake_flite):
    """The stand-in's tone is 200 Hz x f0_shift; resampled as if recorded at size x the rate, it moves by size."""
    out = tmp_path / "synth"
    assert speechsynth.write_words(out, {"7": "seven"}, voices=4, takes=1, sample_rate=8000, seed=5,
                                   synthesizer="flite") == 4
    voices = speechsynth.draw_voices(4, 1, seed=5, synthesizer="flite")
    for i, voice in enumerate(voices):
        audio, rate = sf.read(out / f"7_flite_{i}.wav", dtype="float32")
        assert rate == 8000
        assert dominant_hz(audio, rate) == pytest.approx(200 * voice.pitch * voice.size, abs=5)
        stretched = 0.1 * round(voice.speeds[0], 3) * len("seven") / voice.size  # seconds of tone
        assert audio.size / rate == pytest.approx(stretched + 0.02, abs=0.01)  # + the two 10 ms margins
    assert fake_flite.read_text().splitlines()[0].split() == voices[0].command("seven", voices[0].speeds[0])[1:]


def test_trim_keeps_a_margin_around_the_loud_part():
    audio = np.zeros(1000, np.float32)
    audio[400:500] = 0.5
    audio[100] = 0.001  # below 1% of the peak: silence
    kept = speechsynth.trim(audio, margin=20)
    assert kept.size == 20 + 100 + 19 and kept[20] == 0.5 and kept[0] == kept[-1] == 0.0  # end exclusive
    assert speechsynth.trim(np.zeros(100, np.float32), margin=5).size == 0
    assert speechsynth.trim(audio[400:], margin=50)[0] == 0.5  # the margin stops at the clip's start


def test_write_words_names_files_by_label_group_and_index(tmp_path, fake_espeak):
    out = tmp_path / "synth"
    written = speechsynth.write_words(out, {"0": "zero", "1": "one"}, voices=3, takes=2, sample_rate=8000, seed=0)
    assert written == 12
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{label}_espeak_{i}.wav" for label in "01" for i in range(6))
    audio, rate = sf.read(out / "0_espeak_5.wav", dtype="float32")
    assert rate == 8000 and audio.ndim == 1
    assert 0.4 < np.abs(audio).max() < 0.6 and audio.size < 8000 * 1.0  # resampled, silence trimmed
    assert np.abs(audio[:80 + 10]).max() > 0.1  # speech starts within the 10 ms margin
    calls = fake_espeak.read_text().splitlines()
    voices = speechsynth.draw_voices(3, 2, seed=0)
    assert calls[0].split() == ["-v", voices[0].name, "-p", str(voices[0].pitch), "-s", str(voices[0].speeds[0]),
                                "--stdout", "zero"]
    assert len(calls) == 12 and not list(out.glob(".*"))  # no temporary file left


def test_the_same_seed_writes_the_same_files(tmp_path, fake_espeak):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, seed in ((a, 1), (b, 1), (c, 2)):
        speechsynth.write_words(folder, {"x": "word"}, voices=4, seed=seed, group="tts")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) == [f"x_tts_{i}.wav" for i in range(4)]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_silent_synthesis_is_skipped_and_failures_name_the_command(tmp_path, fake_espeak, caplog):
    assert speechsynth.write_words(tmp_path / "s", {"a": "silence", "b": "bee"}, voices=1) == 1
    assert "said 'silence' in silence" in caplog.text and not (tmp_path / "s" / "a_espeak_0.wav").exists()
    with pytest.raises(DataError, match=r"espeak-ng -v .* fail failed \(1\): voice not found"):
        speechsynth.write_words(tmp_path / "f", {"a": "fail"}, voices=1)


@pytest.mark.parametrize("words, group, message", [
    ({"a_b": "x"}, "espeak", "label 'a_b'"), ({"": "x"}, "espeak", "label ''"),
    ({"a": "x"}, "es_peak", "group 'es_peak'"), ({}, "espeak", "no words"),
])
def test_labels_and_groups_that_would_break_the_file_names_are_refused(tmp_path, fake_espeak, words, group, message):
    with pytest.raises(DataError, match=message):
        speechsynth.write_words(tmp_path / "out", words, voices=1, group=group)
    assert not (tmp_path / "out").exists()


def test_a_missing_synthesizer_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="espeak-ng not found on PATH: install it"):
        speechsynth.write_words(tmp_path / "out", speechsynth.DIGITS, voices=1)
    with pytest.raises(DataError, match=r"flite not found on PATH: install it \(Debian/Ubuntu: apt-get install flite"):
        speechsynth.write_words(tmp_path / "out", speechsynth.DIGITS, voices=1, synthesizer="flite")
    with pytest.raises(DataError, match=r"text2wave not found on PATH: install it \(Debian/Ubuntu: apt-get install "
                                        r"festival festvox-kdlpc16k\)"):
        speechsynth.write_words(tmp_path / "out", speechsynth.DIGITS, voices=1, synthesizer="festival")
    with pytest.raises(DataError, match="synthesizer 'sam'"):
        speechsynth.write_words(tmp_path / "out", speechsynth.DIGITS, voices=1, synthesizer="sam")


def test_speak_command(tmp_path, fake_espeak, fake_flite, capsys):
    assert cli.main(["speak", str(tmp_path / "d"), "--voices", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir())[:3] == ["0_espeak_0.wav", "0_espeak_1.wav",
                                                                       "1_espeak_0.wav"]
    assert "20 clips in" in capsys.readouterr().out
    assert cli.main(["speak", str(tmp_path / "w"), "--words", "yes=yes, no = no", "--voices", "1",
                     "--group", "tts", "--rate", "16000"]) == 0
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["no_tts_0.wav", "yes_tts_0.wav"]
    assert sf.info(tmp_path / "w" / "yes_tts_0.wav").samplerate == 16000
    assert cli.main(["speak", str(tmp_path / "f"), "--synthesizer", "flite", "--words", "a=ay", "--voices", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["a_flite_0.wav", "a_flite_1.wav"]
    assert speechsynth.words_from("digits")["7"] == "seven"
    for bad in ("yes", "yes=", "=yes", ","):
        with pytest.raises(SystemExit):
            cli.main(["speak", str(tmp_path / "x"), "--words", bad])
    with pytest.raises(SystemExit):
        cli.main(["speak", str(tmp_path / "x"), "--synthesizer", "sam"])
    with pytest.raises(SystemExit):
        cli.main(["speak", str(tmp_path / "x"), "--voices", "0"])
    capsys.readouterr()
    code = cli.main(["speak", str(tmp_path / "y"), "--words", "a=fail", "--voices", "1"])
    assert code == 1 and "audiocnn speak: error:" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_real_espeak_speaks_digits_of_speech_length(tmp_path):
    written = speechsynth.write_words(tmp_path, {"7": "seven", "1": "one"}, voices=2, sample_rate=8000, seed=0)
    assert written == 4
    for path in tmp_path.iterdir():
        audio, rate = sf.read(path, dtype="float32")
        assert rate == 8000 and 0.15 < audio.size / rate < 1.2  # one word, silence trimmed
        assert np.abs(audio).max() > 0.05


def test_festival_voices_scale_the_voice_f0_targets_and_write_to_a_file(tmp_path, fake_festival):
    """The stand-in's tone is at the target F0 mean (105 Hz x pitch for ked); then x size, as for flite."""
    voices = speechsynth.draw_voices(20, 2, seed=3, synthesizer="festival")
    assert {v.name for v in voices} == set(speechsynth.FESTIVAL_VOICES)
    assert all(speechsynth.F0_SHIFT[0] <= v.pitch < speechsynth.F0_SHIFT[1] for v in voices)
    assert all(speechsynth.SIZE[0] <= v.size < speechsynth.SIZE[1] for v in voices)
    assert voices[0].command("one", 1.25, "/x.wav") == [
        "text2wave", "-eval", "(voice_ked_diphone)",
        "-eval", f"(set! int_lr_params '((target_f0_mean {105 * voices[0].pitch:.1f}) (target_f0_std "
                 f"{15 * voices[0].pitch:.1f}) (model_f0_mean 170) (model_f0_std 34)))",
        "-eval", "(Parameter.set 'Duration_Stretch 1.250)", "-o", "/x.wav"]
    out = tmp_path / "synth"
    assert speechsynth.write_words(out, {"7": "seven"}, voices=3, sample_rate=8000, seed=5,
                                   synthesizer="festival") == 3
    for i, voice in enumerate(speechsynth.draw_voices(3, 1, seed=5, synthesizer="festival")):
        audio, rate = sf.read(out / f"7_festival_{i}.wav", dtype="float32")
        assert rate == 8000
        assert dominant_hz(audio, rate) == pytest.approx(round(105 * voice.pitch, 1) * voice.size, abs=5)
        assert audio.size / rate == pytest.approx(0.1 * round(voice.speeds[0], 3) * 5 / voice.size + 0.02, abs=0.01)
    assert len(fake_festival.read_text().splitlines()) == 3


def test_a_missing_festival_voice_names_the_command_and_festivals_message(tmp_path, fake_festival, monkeypatch):
    monkeypatch.setattr(speechsynth, "FESTIVAL_VOICES", {"nope_diphone": (100.0, 10.0)})
    with pytest.raises(DataError, match=r"text2wave -eval \(voice_nope_diphone\).*output is not audio.*"
                                        r"SIOD ERROR: unbound variable : voice_nope_diphone"):
        speechsynth.write_words(tmp_path / "out", {"7": "seven"}, voices=1, synthesizer="festival")
    assert not list((tmp_path / "out").iterdir())


FESTIVAL_MISSING = (shutil.which("text2wave") is None
                    or not Path("/usr/share/festival/voices/english/ked_diphone").is_dir())


@pytest.mark.parametrize("synthesizer, voices", [
    pytest.param("flite", 3, marks=pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed")),
    pytest.param("festival", 2, marks=pytest.mark.skipif(
        FESTIVAL_MISSING, reason="festival or its ked voice (festvox-kdlpc16k) is not installed")),
])
def test_real_synthesizer_speaks_digits_of_speech_length(tmp_path, synthesizer, voices):
    written = speechsynth.write_words(tmp_path, {"7": "seven", "1": "one"}, voices=voices, sample_rate=8000, seed=0,
                                      synthesizer=synthesizer)
    assert written == 2 * voices
    for path in tmp_path.iterdir():
        audio, rate = sf.read(path, dtype="float32")
        assert rate == 8000 and 0.15 < audio.size / rate < 1.5  # one word, silence trimmed
        assert np.abs(audio).max() > 0.05
