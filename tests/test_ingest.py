"""Stage ingest: the three layouts, every rejection reason, the threshold, hostile names, an untouched source."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiocnn import fileio, ingest
from audiocnn.config import ParamsError, load_section
from audiocnn.errors import DataError
from audiocnn.ingest import MANIFEST_COLUMNS, IngestParams
from conftest import FSDD, REPO, real_params

_spec = importlib.util.spec_from_file_location("ingest_stage", REPO / "stages" / "ingest.py")
ingest_stage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ingest_stage)

SR = 8000
FSDD_PATTERN = r"^(?P<label>\d)_(?P<group>[a-z]+)_\d+\.wav$"


def make_params(source: Path, **overrides) -> IngestParams:
    """The real params.yaml ingest section pointed at ``source``, with overrides."""
    section = {**real_params()["ingest"], "source": str(source), **overrides}
    return load_section({"ingest": section}, "ingest", IngestParams)


def write_clip(path: Path, seconds: float = 0.3, seed: int = 0, channels: int = 1, **kwargs) -> Path:
    """A noise clip whose content differs per ``seed`` (so it is not a duplicate of another)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).uniform(-0.5, 0.5, (int(seconds * SR), channels))
    tmp = path.parent / f"tmp-{seed}.{path.suffix.lstrip('.').lower() or 'wav'}"
    sf.write(tmp, data, SR, **kwargs)
    tmp.rename(path)  # names soundfile itself could not open for writing
    return path


def rejections(result) -> dict[str, str]:
    return dict(zip(result.rejected["path"], result.rejected["reason"]))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: (kind, bytes hash, mtime) without following symlinks."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                state[str(p)] = ("link", os.readlink(p), st.st_mtime_ns)
            elif p.is_file():
                state[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
            else:
                state[str(p)] = ("dir", st.st_mtime_ns)
    return state


@pytest.fixture
def folders(tmp_path) -> Path:
    source = tmp_path / "src"
    write_clip(source / "dog" / "a.wav", seed=1)
    write_clip(source / "dog" / "deep" / "er" / "b.WAV", seed=2)
    write_clip(source / "cat" / "c.flac", seed=3, format="FLAC")
    write_clip(source / "cat" / "d.ogg", seed=4, format="OGG")
    (source / "cat" / "notes.txt").write_text("not a candidate")
    (source / "cat" / "cover.png").write_bytes(b"\x89PNG")
    return source


# --- params -------------------------------------------------------------------------------------


def test_real_params_section_loads():
    params = load_section(real_params(), "ingest", IngestParams)
    assert params.layout in ("folders", "csv", "pattern") and params.extensions


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"layout": "csv", "csv": ""}, "ingest.csv"),
        ({"layout": "pattern", "pattern": ""}, "ingest.pattern"),
        ({"layout": "pattern", "pattern": "(?P<label>\\d"}, "ingest.pattern"),
        ({"layout": "pattern", "pattern": "(?P<digit>\\d)_.*"}, "ingest.pattern"),
        ({"layout": "tree"}, "ingest.layout"),
        ({"min_duration": -0.1}, "ingest.min_duration"),
        ({"min_duration": 2.0, "max_duration": 2.0}, "ingest.max_duration"),
        ({"max_reject_fraction": 1.5}, "ingest.max_reject_fraction"),
        ({"max_reject_fraction": -0.1}, "ingest.max_reject_fraction"),
        ({"extensions": []}, "ingest.extensions"),
        ({"extensions": [""]}, "ingest.extensions"),
    ],
)
def test_impossible_params_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ParamsError, match=re.escape(key)):
        make_params(tmp_path, **overrides)


def test_extensions_are_normalized(tmp_path):
    assert make_params(tmp_path, extensions=[".WAV", "Flac"]).extensions == ("wav", "flac")


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_source_must_be_a_directory(tmp_path, kind):
    source = tmp_path / "nowhere"
    if kind == "file":
        source.write_text("x")
    with pytest.raises(DataError, match=re.escape(str(source))):
        ingest.ingest(source, make_params(source))


def test_source_without_candidates_fails(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("no audio")
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path))}.*no candidates"):
        ingest.ingest(tmp_path, make_params(tmp_path))


# --- layouts ------------------------------------------------------------------------------------


def test_folders_layout(folders):
    result = ingest.ingest(folders, make_params(folders))
    m = result.manifest
    assert list(m.columns) == list(MANIFEST_COLUMNS)
    assert list(m.path) == ["cat/c.flac", "cat/d.ogg", "dog/a.wav", "dog/deep/er/b.WAV"]
    assert list(m.label) == ["cat", "cat", "dog", "dog"]
    assert set(m.group) == {""} and set(m.fold) == {""}
    assert result.rejected.empty
    assert result.metrics == {"clips": 4, "rejected": 0, "classes": 2, "clips_per_class": {"cat": 2, "dog": 2},
                              "duration_s": pytest.approx(1.2, abs=0.01), "rejected_by_reason": {}}
    for row in m.itertuples():
        assert re.fullmatch(r"[a-z0-9_-]+-[0-9a-f]{8}", row.id)
        assert row.id.endswith(hashlib.sha1(row.path.encode()).hexdigest()[:8])
        assert row.sha256 == hashlib.sha256((folders / row.path).read_bytes()).hexdigest()
        assert row.sample_rate == SR and row.channels == 1 and row.duration == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("layout", ["folders", "pattern", "csv"])
def test_candidates_are_compact_records(tmp_path, layout):
    """One candidate per source file is held while ingest decodes: no per-instance dict, no Path, shared labels."""
    from audiocnn import layouts

    source = tmp_path / "src"
    names = ["dog/1_ann_0.wav", "dog/1_bob_1.wav"]
    for i, name in enumerate(names):
        write_clip(source / name, seed=i)
    (source / "meta.csv").write_text("path,label,group\n" + "".join(f"{n},dog,ann\n" for n in names))
    params = make_params(source, layout=layout, csv="meta.csv" if layout == "csv" else "",
                         pattern=r"(?P<label>\d)_(?P<group>[a-z]+)_\d+\.wav" if layout == "pattern" else "")
    first, second = layouts.discover(source, params)
    assert not hasattr(first, "__dict__")
    assert first.file == str(source / names[0]) and type(first.file) is str
    assert first.label == second.label and first.label is second.label  # one string per class
    assert ingest.ingest(source, params).manifest.path.tolist() == names


def test_folders_layout_file_outside_a_class_folder_has_no_label(folders):
    write_clip(folders / "loose.wav", seed=9)
    result = ingest.ingest(folders, make_params(folders, max_reject_fraction=0.5))
    assert rejections(result) == {"loose.wav": "no_label: file is not inside a class folder"}
    assert result.metrics["rejected_by_reason"] == {"no_label": 1}


def test_csv_layout(tmp_path):
    source = tmp_path / "src"
    for i, name in enumerate(["audio/one.wav", "audio/two.wav", "three.flac", "four.wav"]):
        write_clip(source / name, seed=i, **({"format": "FLAC"} if name.endswith("flac") else {}))
    (source / "meta").mkdir()
    (source / "meta" / "labels.csv").write_text(
        "path,label,fold,group,comment\n"
        "audio/one.wav,yes,1,spk a,x\n"
        "./audio//two.wav, no ,2,spk b,y\n"
        "three.flac,yes,1,,z\n"
        "audio/../four.wav,no,,,\n",
        encoding="utf-8",
    )
    result = ingest.ingest(source, make_params(source, layout="csv", csv="meta/labels.csv"))
    m = result.manifest.set_index("path")
    assert list(m.index) == ["audio/one.wav", "audio/two.wav", "four.wav", "three.flac"]
    assert list(m.label) == ["yes", "no", "no", "yes"]
    assert list(m.fold) == ["1", "2", "", "1"] and list(m["group"]) == ["spk a", "spk b", "", ""]
    assert result.rejected.empty


def test_csv_layout_rejections(tmp_path):
    source = tmp_path / "src"
    outside = write_clip(tmp_path / "secret.wav", seed=50)
    for i in range(6):
        write_clip(source / f"ok{i}.wav", seed=i)
    (source / "text.wav").write_text("plain text")
    (source / "meta.csv").write_text(
        "path,label\n"
        + "".join(f"ok{i}.wav,a\n" for i in range(4))
        + "ok0.wav,a\n"  # listed twice, same label
        + "ok4.wav,a\nok4.wav,b\n"  # listed twice, two labels
        + "ok5.wav,\n"  # no label
        + "gone.wav,a\n"
        + "../secret.wav,a\n../../../../../../etc/passwd,a\n"
        + f"{outside},a\n{source / 'ok1.wav'},a\n"
        + "text.wav,a\n,a\n"
    )
    result = ingest.ingest(source, make_params(source, layout="csv", csv="meta.csv", max_reject_fraction=1.0))
    assert list(result.manifest.path) == ["ok0.wav", "ok1.wav", "ok2.wav", "ok3.wav"]
    reasons = result.rejected.groupby("path")["reason"].apply(list).to_dict()
    assert reasons["ok0.wav"] == ["duplicate: listed more than once in csv"]
    assert reasons["ok4.wav"] == ["duplicate_conflict: listed in csv with labels a, b"] * 2
    assert reasons["ok5.wav"][0].startswith("no_label")
    assert reasons["gone.wav"][0] == "missing: file listed in csv does not exist (csv row 9)"
    assert reasons["../secret.wav"][0] == f"outside_source: resolves to {outside}"
    assert reasons["../../../../../../etc/passwd"][0] == "outside_source: resolves to /etc/passwd"
    assert reasons[str(outside)][0].startswith("outside_source")
    assert reasons[str(source / "ok1.wav")][0].startswith("outside_source")  # absolute: never accepted
    assert reasons["text.wav"][0].startswith("unreadable: ")
    assert reasons[""][0].startswith("missing: empty path")
    assert result.metrics["rejected"] == len(result.rejected) == 11


@pytest.mark.parametrize("content, match", [(None, "does not exist"), ("file,label\nx.wav,a\n", "missing column")])
def test_bad_metadata_file_fails_naming_it(tmp_path, content, match):
    if content is not None:
        (tmp_path / "meta.csv").write_text(content)
    with pytest.raises(DataError) as err:
        ingest.ingest(tmp_path, make_params(tmp_path, layout="csv", csv="meta.csv"))
    assert str(tmp_path / "meta.csv") in str(err.value) and match in str(err.value)


def test_pattern_layout_on_fsdd_like_names(tmp_path):
    source = tmp_path / "recordings"
    names = ["0_george_0.wav", "0_george_1.wav", "7_jackson_32.wav", "sub/3_theo_10.wav", "9_lucas_4.wav"]
    for i, name in enumerate(names):
        write_clip(source / name, seed=i)
    write_clip(source / "0_george_0.wav.bak.wav", seed=99)  # has an audio extension, does not match
    write_clip(source / "x0_george_0.wav", seed=98)  # fullmatch: a prefix is not ignored
    result = ingest.ingest(source, make_params(source, layout="pattern", pattern=FSDD_PATTERN,
                                               max_reject_fraction=0.5))
    m = result.manifest.set_index("path")
    assert m.loc["sub/3_theo_10.wav", "label"] == "3" and m.loc["sub/3_theo_10.wav", "group"] == "theo"
    assert m.loc["7_jackson_32.wav", "group"] == "jackson" and set(m.fold) == {""}
    assert result.metrics["clips_per_class"] == {"0": 2, "3": 1, "7": 1, "9": 1}
    assert rejections(result) == {p: "no_label: file name does not match ingest.pattern"
                                  for p in ("0_george_0.wav.bak.wav", "x0_george_0.wav")}


def test_pattern_must_match_the_whole_name(tmp_path):
    write_clip(tmp_path / "1_ann_0.wav", seed=1)
    write_clip(tmp_path / "12_ann_0.wav", seed=2)  # re.search would label this "2"
    write_clip(tmp_path / "1_ann_0.wav.wav", seed=3)
    params = make_params(tmp_path, layout="pattern", pattern=r"(?P<label>\d)_[a-z]+_\d+\.wav", max_reject_fraction=1.0)
    result = ingest.ingest(tmp_path, params)
    assert list(result.manifest.path) == ["1_ann_0.wav"]
    assert sorted(result.rejected.path) == ["12_ann_0.wav", "1_ann_0.wav.wav"]


def test_pattern_with_fold_group(tmp_path):
    write_clip(tmp_path / "fold3-dog-001.wav", seed=1)
    params = make_params(tmp_path, layout="pattern", pattern=r"fold(?P<fold>\d+)-(?P<label>[a-z]+)-\d+\.wav")
    row = ingest.ingest(tmp_path, params).manifest.iloc[0]
    assert (row.label, row.fold, row.group) == ("dog", "3", "")


# --- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("a.wav", {"subtype": "PCM_U8"}), ("b.wav", {"subtype": "PCM_16"}), ("c.wav", {"subtype": "PCM_24"}),
        ("d.wav", {"subtype": "PCM_32"}), ("e.wav", {"subtype": "FLOAT"}), ("f.wav", {"subtype": "DOUBLE"}),
        ("g.flac", {"format": "FLAC", "subtype": "PCM_S8"}), ("h.flac", {"format": "FLAC", "subtype": "PCM_24"}),
        ("i.ogg", {"format": "OGG", "subtype": "VORBIS"}), ("j.mp3", {"format": "MP3"}),
    ],
)
@pytest.mark.parametrize("channels", [1, 2, 8])
def test_formats_and_channels_are_kept(tmp_path, name, kwargs, channels):
    if name.endswith("mp3") and channels > 2:
        pytest.skip("MPEG audio holds at most 2 channels")
    try:
        write_clip(tmp_path / "c" / name, seconds=1.0, channels=channels, **kwargs)
    except sf.LibsndfileError as err:
        pytest.skip(f"soundfile cannot write {name} here: {err}")
    row = ingest.ingest(tmp_path, make_params(tmp_path)).manifest.iloc[0]
    assert (row.path, row.sample_rate, row.channels) == (f"c/{name}", SR, channels)
    assert row.duration == pytest.approx(1.0, abs=0.1)


# --- rejections -----------------------------------------------------------------------------------


def test_every_reason(tmp_path):
    source = tmp_path / "src"
    for i in range(20):
        write_clip(source / "good" / f"{i:02d}.wav", seed=i)
    (source / "bad").mkdir()
    (source / "bad" / "text.wav").write_text("this is not audio")
    sf.write(source / "bad" / "empty.wav", np.zeros((0, 1)), SR)
    write_clip(source / "bad" / "short.wav", seconds=0.05, seed=30)
    nan = np.full((800, 1), 0.1, dtype=np.float32)
    nan[5] = np.nan
    sf.write(source / "bad" / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(source / "bad" / "silent.wav", np.zeros((800, 1)), SR, subtype="PCM_16")
    write_clip(source / "good" / "zz_copy.wav", seed=3)  # same bytes as good/03.wav, same label
    write_clip(source / "good" / "twin.wav", seed=40)
    write_clip(source / "other" / "twin.wav", seed=40)  # same bytes, another label
    write_clip(tmp_path / "outside.wav", seed=41)
    os.symlink(tmp_path / "outside.wav", source / "good" / "link.wav")
    result = ingest.ingest(source, make_params(source, max_reject_fraction=0.5))
    assert rejections(result) == {
        "bad/empty.wav": "empty: 0 samples",
        "bad/nan.wav": "non_finite: 1 NaN/Inf samples",
        "bad/short.wav": "too_short: 0.05 s < ingest.min_duration=0.1",
        "bad/silent.wav": "silent: all samples are zero",
        "bad/text.wav": "unreadable: Format not recognised.",
        "good/link.wav": f"outside_source: resolves to {tmp_path / 'outside.wav'}",
        "good/twin.wav": "duplicate_conflict: same content as other/twin.wav labelled other",
        "good/zz_copy.wav": "duplicate: same content as good/03.wav",
        "other/twin.wav": "duplicate_conflict: same content as good/twin.wav labelled good",
    }
    assert list(result.manifest.path) == [f"good/{i:02d}.wav" for i in range(20)]
    assert result.metrics["rejected_by_reason"] == {
        "duplicate": 1, "duplicate_conflict": 2, "empty": 1, "non_finite": 1, "outside_source": 1,
        "silent": 1, "too_short": 1, "unreadable": 1,
    }
    assert "other" not in result.metrics["clips_per_class"]  # a class with no kept clip does not appear


def test_long_clips_are_kept_with_their_true_duration(tmp_path):
    write_clip(tmp_path / "a" / "long.wav", seconds=3.0, seed=1)
    result = ingest.ingest(tmp_path, make_params(tmp_path, max_duration=1.0))
    assert result.manifest.duration.tolist() == [pytest.approx(3.0)]


def test_reject_threshold_fails_with_the_list(tmp_path):
    write_clip(tmp_path / "a" / "ok.wav", seed=1)
    for i in range(25):
        (tmp_path / "a" / f"junk{i:02d}.wav").write_bytes(b"junk")
    with pytest.raises(DataError) as err:
        ingest.ingest(tmp_path, make_params(tmp_path, max_reject_fraction=0.5))
    message = str(err.value)
    assert "rejected 25 of 26" in message and "ingest.max_reject_fraction=0.5" in message
    assert "a/junk00.wav: unreadable" in message and "a/junk19.wav" in message and "a/junk20.wav" not in message
    assert "and 5 more" in message


def test_exactly_at_the_threshold_passes_and_nothing_kept_fails(tmp_path):
    write_clip(tmp_path / "a" / "ok.wav", seed=1)
    (tmp_path / "a" / "junk.wav").write_bytes(b"junk")
    assert len(ingest.ingest(tmp_path, make_params(tmp_path, max_reject_fraction=0.5)).manifest) == 1
    (tmp_path / "a" / "ok.wav").unlink()
    with pytest.raises(DataError, match="no clip is left"):
        ingest.ingest(tmp_path, make_params(tmp_path, max_reject_fraction=1.0))


@pytest.mark.timeout(30)
def test_symlinks_loops_and_folders(tmp_path):
    source = tmp_path / "src"
    write_clip(source / "a" / "x.wav", seed=1)
    write_clip(tmp_path / "elsewhere" / "y.wav", seed=2)
    os.symlink("..", source / "a" / "up")  # folder loop
    os.symlink("loop.wav", source / "a" / "loop.wav")  # file loop
    os.symlink("ping.wav", source / "a" / "pong.wav")
    os.symlink("pong.wav", source / "a" / "ping.wav")
    os.symlink(tmp_path / "elsewhere", source / "a" / "ext")  # folder outside
    os.symlink("/etc/passwd", source / "a" / "passwd.wav")
    os.symlink("x.wav", source / "a" / "alias.wav")  # inside: a duplicate of x.wav
    os.symlink("nothing.wav", source / "a" / "dangling.wav")
    os.mkfifo(source / "a" / "fifo.wav")  # opening a fifo would block
    result = ingest.ingest(source, make_params(source, max_reject_fraction=1.0))
    assert list(result.manifest.path) == ["a/alias.wav"]  # first by path of the two names of x.wav
    reasons = rejections(result)
    assert reasons.pop("a/x.wav") == "duplicate: same content as a/alias.wav"
    assert reasons.pop("a/ext") == f"outside_source: resolves to {tmp_path / 'elsewhere'}"
    assert reasons.pop("a/passwd.wav") == "outside_source: resolves to /etc/passwd"
    assert reasons.pop("a/fifo.wav") == "unreadable: not a regular file"
    assert reasons.pop("a/dangling.wav") == "unreadable: No such file or directory"
    assert set(reasons) == {"a/loop.wav", "a/ping.wav", "a/pong.wav"}
    assert all(r.startswith("unreadable: ") for r in reasons.values())


def test_hidden_entries_are_skipped(folders):
    write_clip(folders / "dog" / "._a.wav", seed=60)
    write_clip(folders / ".cache" / "z.wav", seed=61)
    assert len(ingest.ingest(folders, make_params(folders)).manifest) == 4


# --- names, outputs, the source -----------------------------------------------------------------


HOSTILE_CLASSES = ["-rf class", "ünï cødé 音", 'quo"te', "com,ma", "it's"]
HOSTILE_FILES = ["-x.wav", "a, b.wav", 'say "hi".wav', "line\nbreak.wav", "ñ €.WAV", " lead space.wav"]


def test_hostile_names_round_trip(tmp_path):
    source = tmp_path / "src"
    paths = [f"{c}/{f}" for c in HOSTILE_CLASSES for f in HOSTILE_FILES]
    for i, rel in enumerate(paths):
        write_clip(source / rel, seed=i)
    write_clip(source / "com,ma" / "bad\xe9.wav".encode("latin-1").decode("utf-8", "surrogateescape"), seed=999)
    # ^ a name with a byte that is not UTF-8 (\xe9): rejected, shown escaped
    out = tmp_path / "out"
    result = ingest.ingest(source, make_params(source, max_reject_fraction=0.1))
    ingest.write_outputs(result, out / "manifest.csv", out / "rejected.csv", out / "ingest.json")
    manifest = fileio.read_csv(out / "manifest.csv")
    assert sorted(manifest.path) == sorted(paths) and list(manifest.path) == sorted(paths)
    assert set(manifest.label) == set(HOSTILE_CLASSES)
    assert all((source / p).is_file() for p in manifest.path)
    assert manifest.id.is_unique and all(re.fullmatch(r"[a-z0-9_-]+-[0-9a-f]{8}", i) for i in manifest.id)
    assert fileio.read_csv(out / "rejected.csv").to_dict("records") == [
        {"path": "com,ma/bad\\xe9.wav", "reason": "unreadable: file name is not valid UTF-8"}
    ]
    assert json.loads((out / "ingest.json").read_text(encoding="utf-8"))["clips_per_class"]["ünï cødé 音"] == 6


def test_outputs_are_deterministic_and_the_source_untouched(folders, tmp_path):
    write_clip(folders / "dog" / "copy.wav", seed=1)  # a duplicate, to exercise the rejected csv
    before = snapshot(folders)
    outputs = []
    for run in ("one", "two"):
        out = tmp_path / run
        ingest.run(folders, make_params(folders, max_reject_fraction=0.5),
                   out / "m.csv", out / "r.csv", out / "metrics.json")
        outputs.append([(out / name).read_bytes() for name in ("m.csv", "r.csv", "metrics.json")])
    assert outputs[0] == outputs[1]
    assert snapshot(folders) == before
    header = outputs[0][0].decode().splitlines()[0]
    assert header == ",".join(MANIFEST_COLUMNS) and outputs[0][1].decode().startswith("path,reason\n")
    metrics = json.loads(outputs[0][2])
    assert set(metrics) == {"clips", "rejected", "classes", "clips_per_class", "duration_s", "rejected_by_reason"}


def test_stage_script(folders, tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps({"ingest": {**real_params()["ingest"], "source": str(folders)}}))
    out = tmp_path / "out"
    argv = ["--params", str(params_file), "--source", str(folders), "--manifest", str(out / "manifest.csv"),
            "--rejected", str(out / "rejected.csv"), "--metrics", str(out / "ingest.json")]
    ingest_stage.main(argv)
    assert len(fileio.read_csv(out / "manifest.csv")) == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    argv[3] = str(empty)
    with pytest.raises(SystemExit) as exit_:
        ingest_stage.stage.run(ingest_stage.main, argv)
    assert exit_.value.code == 2


# --- real recordings ------------------------------------------------------------------------------


@pytest.mark.skipif(not FSDD.is_dir(), reason=f"FSDD not found at {FSDD}")
def test_real_fsdd_files_in_place(tmp_path):
    names = ["0_george_0.wav", "3_theo_17.wav", "7_jackson_32.wav", "9_yweweler_49.wav", "5_nicolas_8.wav"]
    listing = tmp_path / "fsdd.csv"  # outside the read-only dataset; an absolute ingest.csv
    listing.write_text("path,label,group\n" + "".join(f"{n},{n[0]},{n.split('_')[1]}\n" for n in names))
    result = ingest.ingest(FSDD, make_params(FSDD, layout="csv", csv=str(listing)))
    m = result.manifest
    assert sorted(names) == list(m.path) and result.rejected.empty
    assert set(m.sample_rate) == {8000} and set(m.channels) == {1}
    assert m.duration.between(0.1, 2.5).all()
    assert m.sha256.tolist() == [hashlib.sha256((FSDD / p).read_bytes()).hexdigest() for p in m.path]


@pytest.mark.skipif(not FSDD.is_dir(), reason=f"FSDD not found at {FSDD}")
def test_real_fsdd_pattern_layout_whole_set():
    result = ingest.ingest(FSDD, make_params(FSDD, layout="pattern", pattern=FSDD_PATTERN))
    assert result.metrics["clips"] == 3000 and result.metrics["rejected"] == 0
    assert result.metrics["clips_per_class"] == {str(d): 300 for d in range(10)}
    assert result.manifest.groupby("group").size().to_dict() == {s: 500 for s in (
        "george", "jackson", "lucas", "nicolas", "theo", "yweweler")}


def aged(*paths: Path, seconds: float = 60.0) -> None:
    """Set the files' mtime ``seconds`` in the past (fresh files are 'racy' and not memoized)."""
    for path in paths:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


@pytest.fixture
def counted_scans(monkeypatch, tmp_path):
    """Files actually decoded by ingest (not taken from its memo), with the cache under tmp_path."""
    monkeypatch.setenv("AUDIOCNN_CACHE_DIR", str(tmp_path / "cache"))
    decoded: list[str] = []
    scan = ingest.audio.scan
    monkeypatch.setattr(ingest.audio, "scan", lambda path, *a, **k: decoded.append(Path(path).name) or scan(path, *a, **k))
    return decoded


def test_rerun_decodes_only_new_and_changed_files(tmp_path, counted_scans):
    source = tmp_path / "src"
    clips = [write_clip(source / "a" / f"a{i}.wav", seed=i) for i in range(3)]
    short = write_clip(source / "b" / "short.wav", seconds=0.05, seed=9)  # rejected too_short: memoized too
    aged(*clips, short)
    first = ingest.ingest(source, make_params(source, max_reject_fraction=0.5))
    assert sorted(counted_scans) == ["a0.wav", "a1.wav", "a2.wav", "short.wav"]
    counted_scans.clear()
    again = ingest.ingest(source, make_params(source, max_reject_fraction=0.5))
    assert counted_scans == []  # nothing decoded or hashed again
    assert again.manifest.equals(first.manifest) and again.rejected.equals(first.rejected)

    aged(write_clip(source / "b" / "b0.wav", seed=20))  # a new file
    write_clip(clips[1], seed=21)  # a1 rewritten in place (same size, new content, new mtime)
    aged(clips[1], seconds=30.0)
    third = ingest.ingest(source, make_params(source, max_reject_fraction=0.5))
    assert sorted(counted_scans) == ["a1.wav", "b0.wav"]
    rows = third.manifest.set_index("path")
    assert rows.loc["a/a1.wav", "sha256"] == hashlib.sha256(clips[1].read_bytes()).hexdigest()
    assert len(rows) == 4 and rows.loc["a/a0.wav", "sha256"] == first.manifest.set_index("path").loc["a/a0.wav", "sha256"]
    counted_scans.clear()
    looser = ingest.ingest(source, make_params(source, min_duration=0.01))  # the memo keeps scans, not verdicts
    assert counted_scans == [] and "b/short.wav" in set(looser.manifest["path"])
    assert looser.manifest.set_index("path").loc["b/short.wav", "sha256"] == hashlib.sha256(short.read_bytes()).hexdigest()


def test_recently_modified_files_are_not_memoized(tmp_path, counted_scans):
    source = tmp_path / "src"
    write_clip(source / "a" / "fresh.wav", seed=1)  # mtime now: within the racy window
    ingest.ingest(source, make_params(source))
    ingest.ingest(source, make_params(source))
    assert counted_scans == ["fresh.wav", "fresh.wav"]


def test_a_damaged_memo_is_ignored_and_rewritten(tmp_path, counted_scans, caplog):
    source = tmp_path / "src"
    aged(write_clip(source / "a" / "x.wav", seed=1))
    first = ingest.ingest(source, make_params(source))
    (memo,) = (tmp_path / "cache" / "ingest").glob("*.json")
    memo.write_text('{"files": ')
    with caplog.at_level("WARNING"):
        again = ingest.ingest(source, make_params(source))
    assert counted_scans == ["x.wav", "x.wav"] and again.manifest.equals(first.manifest)
    assert str(memo) in caplog.text and "does not load" in caplog.text
    assert "x.wav" in memo.read_text()  # rewritten whole


def test_memo_entries_it_did_not_write_are_ignored(tmp_path, counted_scans):
    source = tmp_path / "src"
    aged(write_clip(source / "a" / "x.wav", seed=1), write_clip(source / "a" / "y.wav", seed=2))
    first = ingest.ingest(source, make_params(source))
    (memo,) = (tmp_path / "cache" / "ingest").glob("*.json")
    files = json.loads(memo.read_text())["files"]
    x, y = sorted(files)
    files[x] = files[x][:8]  # one field short
    files[y] = 7  # not a list
    memo.write_text(json.dumps({"files": files}))
    again = ingest.ingest(source, make_params(source))
    assert sorted(counted_scans) == ["x.wav", "x.wav", "y.wav", "y.wav"] and again.manifest.equals(first.manifest)


def test_a_hash_computed_later_is_memoized(tmp_path, counted_scans, monkeypatch):
    source = tmp_path / "src"
    aged(write_clip(source / "a" / "x.wav", seconds=0.05, seed=1), write_clip(source / "a" / "y.wav", seed=2))
    ingest.ingest(source, make_params(source, max_reject_fraction=0.5))  # x too short: scanned, not hashed
    hashed = []
    sha = ingest.sha256_file
    monkeypatch.setattr(ingest, "sha256_file", lambda path: hashed.append(Path(path).name) or sha(path))
    for _ in range(2):
        ingest.ingest(source, make_params(source, min_duration=0.01))
    assert hashed == ["x.wav"]  # hashed once when it first passed, then taken from the memo


def test_memo_off_with_the_cache(tmp_path, counted_scans, monkeypatch):
    monkeypatch.setenv("AUDIOCNN_CACHE_DIR", "off")
    source = tmp_path / "src"
    aged(write_clip(source / "a" / "x.wav", seed=1))
    ingest.ingest(source, make_params(source))
    ingest.ingest(source, make_params(source))
    assert counted_scans == ["x.wav", "x.wav"] and not (tmp_path / "cache").exists()
