"""fileio's columns: CSV read and written without pandas, and rows handed out one dict at a time."""

from __future__ import annotations

import numpy as np
import pytest

from audiocnn import fileio


def index_columns(rows: int) -> dict[str, list[str]]:
    return {"id": [f"clip{i:05d}" for i in range(rows)], "label": [f"class{i % 3}" for i in range(rows)],
            "group": [""] * rows, "samples": [str(4000 + i % 7) for i in range(rows)]}


def test_read_columns_round_trips_across_blocks_and_keeps_a_repeated_text_once(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "READ_BLOCK", 8)  # 21 rows: three blocks, the last one short
    columns = index_columns(21)
    fileio.write_columns(tmp_path / "index.csv", columns)
    read = fileio.read_columns(tmp_path / "index.csv")
    assert read == columns and list(read) == list(columns)
    assert len({id(text) for text in read["label"]}) == 3  # one object per label, not one per row
    assert len({id(text) for text in read["id"]}) == 21
    assert fileio.read_columns(tmp_path / "index.csv", ["label", "nope"]) == {"label": columns["label"]}
    fileio.write_columns(tmp_path / "empty.csv", {"id": [], "label": []})
    assert fileio.read_columns(tmp_path / "empty.csv") == {"id": [], "label": []}


@pytest.mark.parametrize("bad_row", [3, 12])  # in the first block, in a later one
def test_read_columns_names_the_file_and_line_of_a_short_row(tmp_path, monkeypatch, bad_row):
    monkeypatch.setattr(fileio, "READ_BLOCK", 8)
    lines = ["id,label"] + [f"c{i},a" for i in range(20)]
    lines[bad_row] = "c_short"
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"index.csv: row {bad_row + 1} has 1 fields, its header 2"):
        fileio.read_columns(tmp_path / "index.csv")


def test_rows_are_column_records_built_on_demand():
    columns = {"id": ["a", "b", "c", "d"], "offset": np.array([0, 5, 9, 12])}
    rows = fileio.Rows(columns)
    assert len(rows) == 4 and list(rows) == fileio.column_records(columns)
    assert rows[-1] == {"id": "d", "offset": 12} and rows[1:3] == fileio.column_records(columns)[1:3]
    subset = fileio.Rows(columns, at=np.array([3, 1]))
    assert len(subset) == 2 and list(subset) == [{"id": "d", "offset": 12}, {"id": "b", "offset": 5}]
    assert subset[0:5] == list(subset) and subset[-1]["id"] == "b"
    with pytest.raises(IndexError, match="row 2 of 2"):
        subset[2]
    columns["offset"][3] = 99  # the columns are shared, not copied
    assert rows[3]["offset"] == 99 and subset[0]["offset"] == 99
    with pytest.raises(ValueError, match=r"columns of different lengths: \[2, 3\]"):
        fileio.Rows({"id": ["a", "b"], "x": [1, 2, 3]})
    assert len(fileio.Rows({})) == 0
