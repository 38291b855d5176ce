"""split: disjoint, complete, stratified, group-exclusive, fold-true, deterministic, loud on tiny classes."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from audiocnn import config, fileio, split
from audiocnn.config import ParamsError
from audiocnn.errors import DataError
from audiocnn.split import SplitParams

REPO = Path(__file__).resolve().parents[1]


def split_params(**overrides) -> SplitParams:
    section = {**config.read_params(REPO / "params.yaml")["split"], **overrides}
    return config.load_section({"split": section}, "split", SplitParams)


def make_index(per_class: dict[str, int], groups: int = 6, folds: int = 5) -> pd.DataFrame:
    """A features index: clip k of a class is in group k % groups and fold k % folds + 1."""
    rows = [{"id": f"{label}-{k:03d}", "path": f"{label}/{k}.wav", "label": label, "group": f"g{k % groups}",
             "fold": str(k % folds + 1), "samples": "100", "frames": "1", "image": ""}
            for label, n in per_class.items() for k in range(n)]
    return pd.DataFrame(rows)


def parts(index: pd.DataFrame, params: SplitParams) -> dict[str, pd.DataFrame]:
    assigned = split.assign(index.sort_values("id").reset_index(drop=True), params)
    ordered = index.sort_values("id").reset_index(drop=True)
    return {name: ordered[assigned == name] for name in split.SPLITS}


def assert_partition(index: pd.DataFrame, got: dict[str, pd.DataFrame]) -> None:
    ids = [set(part["id"]) for part in got.values()]
    assert sum(map(len, ids)) == len(index) and set().union(*ids) == set(index["id"])


def test_params_validation_names_keys():
    with pytest.raises(ParamsError, match=r"^split\.val_size=0\.5 plus split\.test_size=0\.5 must be below 1"):
        split_params(val_size=0.5, test_size=0.5)
    with pytest.raises(ParamsError, match=r"^split\.test_size=0\.0 must be in \(0, 1\)"):
        split_params(test_size=0.0)
    with pytest.raises(ParamsError, match=r"^split\.test_folds=\[\] must name at least one fold"):
        split_params(strategy="fold")
    with pytest.raises(ParamsError, match=r"^split\.val_folds=\[2\] shares fold\(s\) 2 with split\.test_folds"):
        split_params(strategy="fold", test_folds=[1, "2"], val_folds=[2])


def test_stratified_partition_ratios_and_determinism():
    index = make_index({"a": 100, "b": 40, "c": 7})
    params = split_params(val_size=0.2, test_size=0.1)
    got = parts(index, params)
    assert_partition(index, got)
    counts = {name: part["label"].value_counts().to_dict() for name, part in got.items()}
    assert counts["test"] == {"a": 10, "b": 4, "c": 1} and counts["val"] == {"a": 20, "b": 8, "c": 1}
    shuffled = index.sample(frac=1.0, random_state=3)
    assert all(got[n]["id"].tolist() == parts(shuffled, params)[n]["id"].tolist() for n in split.SPLITS)
    other = parts(index, split_params(val_size=0.2, test_size=0.1, seed=1))
    assert set(other["test"]["id"]) != set(got["test"]["id"])


def test_stratified_three_clips_is_enough_two_is_not():
    got = parts(make_index({"a": 30, "tiny": 3}), split_params())
    assert all((part["label"] == "tiny").sum() == 1 for part in got.values())
    with pytest.raises(DataError, match=r"class 'tiny' has 2 clip\(s\): too few to split, needs at least 3"):
        parts(make_index({"a": 30, "tiny": 2}), split_params())


def test_group_exclusive_and_stratified():
    index = make_index({"a": 60, "b": 60, "c": 30}, groups=10)
    got = parts(index, split_params(strategy="group", val_size=0.2, test_size=0.2))
    assert_partition(index, got)
    groups = [set(part["group"]) for part in got.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert [len(g) for g in groups] == [6, 2, 2]
    for part in got.values():
        assert part["label"].value_counts()["a"] == 2 * part["label"].value_counts()["c"]
    other = parts(index, split_params(strategy="group", val_size=0.2, test_size=0.2, seed=5))
    assert set(other["test"]["group"]) != set(got["test"]["group"])


def test_group_single_class_groups_cover_every_split():
    index = make_index({"a": 100, "b": 50, "c": 20}, groups=10)
    index["group"] = index["label"] + "_" + index["group"]  # sessions that each hold one class
    got = parts(index, split_params(strategy="group", val_size=0.15, test_size=0.15))
    counts = {name: part["label"].value_counts().to_dict() for name, part in got.items()}
    assert counts["train"] == {"a": 70, "b": 35, "c": 14}  # 7 of 10 groups of each class
    assert all(set(c) == {"a", "b", "c"} for c in counts.values())


def test_group_errors():
    index = make_index({"a": 20})
    index.loc[3, "group"] = ""
    with pytest.raises(DataError, match=r"needs column 'group', empty in 1 of 20 rows \(e\.g\. a/3\.wav\)"):
        split.assign(index, split_params(strategy="group"))
    with pytest.raises(DataError, match=r"class 'a' has no clip in test \(clips: train \d+, val \d+, test 0, in 2"):
        split.assign(make_index({"a": 20}, groups=2), split_params(strategy="group"))


def test_fold_semantics():
    index = make_index({"a": 50, "b": 30}, folds=5)
    got = parts(index, split_params(strategy="fold", test_folds=[5], val_folds=["4"]))
    assert set(got["test"]["fold"]) == {"5"} and set(got["val"]["fold"]) == {"4"}
    assert set(got["train"]["fold"]) == {"1", "2", "3"}
    drawn = parts(index, split_params(strategy="fold", test_folds=[1, 2], val_folds=[], val_size=0.25))
    assert_partition(index, drawn)
    assert set(drawn["test"]["fold"]) == {"1", "2"} and set(drawn["val"]["fold"]) <= {"3", "4", "5"}
    assert drawn["val"]["label"].value_counts().to_dict() == {"a": 8, "b": 5}  # 25% of 30 and of 18, half up


def test_fold_absent_or_empty():
    with pytest.raises(DataError, match=r"split\.test_folds: fold\(s\) 9 not in column 'fold' \(present: 1, 2"):
        split.assign(make_index({"a": 20}), split_params(strategy="fold", test_folds=[9]))
    index = make_index({"a": 20})
    index.loc[0, "fold"] = ""
    with pytest.raises(DataError, match=r"needs column 'fold', empty in 1 of 20"):
        split.assign(index, split_params(strategy="fold", test_folds=[1]))


def test_stage_writes_csvs_and_metrics(tmp_path):
    index = make_index({"a": 20, "b": 10})
    fileio.write_csv(tmp_path / "features" / "index.csv", index.assign(offset=[str(10 * i) for i in range(30)]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(config.read_params(REPO / "params.yaml")))
    main = runpy.run_path(str(REPO / "stages" / "split.py"))["main"]
    argv = ["--params", str(tmp_path / "params.yaml"), "--features", str(tmp_path / "features"),
            "--out", str(tmp_path / "split"), "--metrics", str(tmp_path / "split.json")]
    main(argv)
    metrics = fileio.read_json(tmp_path / "split.json")
    assert metrics["test"] == {"clips": 5, "per_class": {"a": 3, "b": 2}}
    assert sum(m["clips"] for m in metrics.values()) == 30
    first = {n: (tmp_path / "split" / f"{n}.csv").read_bytes() for n in split.SPLITS}
    train = fileio.read_csv(tmp_path / "split" / "train.csv")
    assert list(train.columns) == list(index.columns) and len(train)  # no offset: the features' business == metrics["train"]["clips"]
    main(argv)
    assert first == {n: (tmp_path / "split" / f"{n}.csv").read_bytes() for n in split.SPLITS}
    assert np.all(train["id"].to_numpy()[:-1] < train["id"].to_numpy()[1:])
