"""Stage split: the features index -> train/val/test manifests, respecting the data's own structure.

Strategies (every one deterministic for a given seed and index, whatever the row order):
- ``stratified``: per class, shuffle and cut test_size / val_size / rest, each rounded
  but at least one clip, so every class is in every split (a class needs >= 3 clips).
- ``group``: whole groups (speakers, sessions) go to one split. Groups are placed
  greedily, largest first (ties in seeded random order), each into the split where it
  most reduces the squared per-class distance to the target counts (each class
  weighted equally), with a bonus for bringing a class into a split that lacks it.
- ``fold``: predefined folds: test = test_folds, val = val_folds, or, when val_folds
  is empty, val_size of the remaining clips drawn per class as above.
Every class must end up with at least one clip in each split, else DataError.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from audiocnn import fileio
from audiocnn.config import check
from audiocnn.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COVERAGE_BONUS = 1.0  # group strategy: worth a whole class's squared deviation (costs are per class, normalized)


@dataclass(frozen=True)
class SplitParams:
    """``split``: how clips are divided into train, val and test."""

    strategy: Literal["stratified", "group", "fold"]
    val_size: float  # fraction of clips in val (stratified, group; fold with empty val_folds: of the non-test clips)
    test_size: float  # fraction of clips in test (stratified, group)
    test_folds: tuple[int | str, ...]  # strategy fold: values of column fold that form test
    val_folds: tuple[int | str, ...]  # strategy fold: values that form val; empty = drawn per class
    seed: int

    def __post_init__(self) -> None:
        check(0 < self.val_size < 1, "val_size", self.val_size, "must be in (0, 1)")
        check(0 < self.test_size < 1, "test_size", self.test_size, "must be in (0, 1)")
        check(self.val_size + self.test_size < 1, "val_size", self.val_size,
              f"plus split.test_size={self.test_size} must be below 1 (train needs clips)")
        if self.strategy == "fold":
            check(len(self.test_folds) > 0, "test_folds", list(self.test_folds), "must name at least one fold")
        both = sorted({str(f) for f in self.test_folds} & {str(f) for f in self.val_folds})
        check(not both, "val_folds", list(self.val_folds), f"shares fold(s) {', '.join(both)} with split.test_folds")


def per_class_cut(labels: np.ndarray, fractions: dict[str, float], rest: str, rng: np.random.Generator) -> np.ndarray:
    """Assign each row a split name: per class, round(n * fraction) rows (at least 1) to each
    split in ``fractions``, the rest to ``rest`` (at least 1). Rows are in a fixed order."""
    assigned = np.full(len(labels), rest, dtype=object)
    need = len(fractions) + 1
    for label in sorted(set(labels)):
        rows = np.flatnonzero(labels == label)
        if len(rows) < need:
            raise DataError(f"class '{label}' has {len(rows)} clip(s): too few to split, needs at least {need} "
                            f"(one in each of {', '.join([*fractions, rest])})")
        rows = rng.permutation(rows)
        start = 0
        for left, (name, fraction) in enumerate(fractions.items(), start=1):
            count = min(max(1, math.floor(len(rows) * fraction + 0.5)), len(rows) - start - (need - left))
            assigned[rows[start : start + count]] = name
            start += count
    return assigned


def group_assign(labels: np.ndarray, groups: np.ndarray, params: SplitParams) -> np.ndarray:
    """Whole groups to splits, greedily balancing per-class counts (see the module docstring)."""
    classes = sorted(set(labels))
    names = sorted(set(groups))
    counts = pd.crosstab(pd.Series(groups, name="group"), pd.Series(labels, name="label")).reindex(
        index=names, columns=classes, fill_value=0).to_numpy(dtype=float)  # (groups, classes)
    total = counts.sum(axis=0)  # (classes,)
    fractions = np.array([1 - params.val_size - params.test_size, params.val_size, params.test_size])
    target = fractions[:, None] * total[None, :]  # (splits, classes)
    placed = np.zeros_like(target)
    order = np.random.default_rng(params.seed).permutation(len(names))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]  # largest first, seeded ties
    split_of = {}
    for g in order:
        after = (placed + counts[g] - target) ** 2 - (placed - target) ** 2  # (splits, classes)
        cost = (after / total**2).sum(axis=1)
        cost -= COVERAGE_BONUS * ((placed == 0) & (counts[g] > 0)).sum(axis=1)
        best = int(np.argmin(cost))
        placed[best] += counts[g]
        split_of[names[g]] = SPLITS[best]
    return np.array([split_of[g] for g in groups], dtype=object)


def fold_assign(labels: np.ndarray, folds: np.ndarray, params: SplitParams, rng: np.random.Generator) -> np.ndarray:
    """Predefined folds: test_folds, then val_folds or a per-class draw from the rest."""
    present = sorted(set(folds))
    for key, wanted in (("test_folds", params.test_folds), ("val_folds", params.val_folds)):
        absent = sorted({str(f) for f in wanted} - set(present))
        if absent:
            raise DataError(f"split.{key}: fold(s) {', '.join(absent)} not in column 'fold' "
                            f"(present: {', '.join(present)})")
    assigned = np.where(np.isin(folds, [str(f) for f in params.test_folds]), "test", "train").astype(object)
    if params.val_folds:
        assigned[np.isin(folds, [str(f) for f in params.val_folds])] = "val"
    else:
        rest = np.flatnonzero(assigned == "train")
        assigned[rest] = per_class_cut(labels[rest], {"val": params.val_size}, "train", rng)
    return assigned


def assign(index: pd.DataFrame, params: SplitParams, source: str = "index") -> np.ndarray:
    """Split name per row of ``index`` (sorted by id), checked: every class in every split."""
    labels = index["label"].to_numpy(dtype=object)
    rng = np.random.default_rng(params.seed)
    if params.strategy == "stratified":
        assigned = per_class_cut(labels, {"test": params.test_size, "val": params.val_size}, "train", rng)
    else:
        column = "group" if params.strategy == "group" else "fold"
        if column not in index.columns:
            raise DataError(f"{source}: split.strategy={params.strategy} needs column '{column}', which is missing")
        values = index[column].to_numpy(dtype=object)
        empty = np.flatnonzero(values == "")
        if len(empty):
            raise DataError(f"{source}: split.strategy={params.strategy} needs column '{column}', empty in "
                            f"{len(empty)} of {len(values)} rows (e.g. {index['path'].iloc[empty[0]]})")
        if params.strategy == "group":
            assigned = group_assign(labels, values, params)
        else:
            assigned = fold_assign(labels, values, params, rng)
    table = pd.crosstab(pd.Series(labels, name="label"), pd.Series(assigned, name="split")).reindex(
        columns=list(SPLITS), fill_value=0)
    for label, row in table.iterrows():
        if (row == 0).any():
            counts = ", ".join(f"{split} {row[split]}" for split in SPLITS)
            where = ""
            if params.strategy == "group":
                where = f", in {index.loc[labels == label, 'group'].nunique()} group(s)"
            raise DataError(f"class '{label}' has no clip in {', '.join(s for s in SPLITS if row[s] == 0)} "
                            f"(clips: {counts}{where}); split.strategy={params.strategy} needs at least 1 clip of "
                            "every class in each split: add data, merge or drop the class, or change the strategy")
    return assigned


def run(features: Path, out: Path, metrics: Path, params: SplitParams) -> None:
    """Read ``features/index.csv``; write ``out/{train,val,test}.csv`` and the split metrics."""
    index_path = features / "index.csv"
    index = fileio.read_csv(index_path)
    missing = sorted({"id", "label", "path"} - set(index.columns))
    if missing:
        raise DataError(f"{index_path}: missing column(s) {', '.join(missing)}")
    if index.empty:
        raise DataError(f"{index_path}: no clips to split")
    if params.strategy != "fold" and (params.test_folds or params.val_folds):
        log.warning("split.test_folds / split.val_folds are ignored by split.strategy=%s", params.strategy)
    index = index.drop(columns="offset", errors="ignore")  # where a clip's rows are is the features' business
    index = index.sort_values("id", kind="stable").reset_index(drop=True)
    assigned = assign(index, params, str(index_path))
    fileio.fresh_dir(out)
    summary = {}
    for split in SPLITS:
        part = index[assigned == split]
        fileio.write_csv(out / f"{split}.csv", part)
        per_class = {str(k): int(v) for k, v in part["label"].value_counts().sort_index().items()}
        summary[split] = {"clips": len(part), "per_class": per_class}
        log.info("%s: %d clips (%.1f%%), per class: %s", split, len(part), 100 * len(part) / len(index),
                 ", ".join(f"{k} {v}" for k, v in per_class.items()))
    fileio.write_json(metrics, summary)
