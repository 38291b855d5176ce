"""The typed params loader: unknown keys, wrong types and impossible values name the key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from audiocnn.config import ParamsError, check, flatten, load, load_section, read_params


@dataclass(frozen=True)
class Inner:
    alpha: float
    bounds: tuple[float, ...]


@dataclass(frozen=True)
class Section:
    size: int
    name: str
    mode: Literal["a", "b"]
    enabled: bool
    inner: Inner

    def __post_init__(self) -> None:
        check(self.size > 0, "size", self.size, "must be positive")


GOOD = {"size": 3, "name": "x", "mode": "a", "enabled": True, "inner": {"alpha": 1, "bounds": [1, 2.5]}}


def test_valid_section_is_typed_and_frozen():
    cfg = load_section({"s": GOOD}, "s", Section)
    assert cfg.inner.alpha == 1.0 and isinstance(cfg.inner.alpha, float)
    assert cfg.inner.bounds == (1.0, 2.5)
    with pytest.raises(AttributeError):
        cfg.size = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"extra": 1}, "unknown key(s) s.extra"),
        ({"size": "3"}, "s.size='3' must be an integer"),
        ({"size": True}, "s.size=True must be an integer"),
        ({"size": -1}, "s.size=-1 must be positive"),
        ({"mode": "c"}, "s.mode='c' must be one of 'a', 'b'"),
        ({"enabled": "yes"}, "s.enabled='yes' must be true or false"),
        ({"inner": {"alpha": 1, "bounds": [1], "beta": 2}}, "unknown key(s) s.inner.beta"),
        ({"inner": {"alpha": "x", "bounds": []}}, "s.inner.alpha='x' must be a number"),
        ({"inner": {"alpha": 1, "bounds": 3}}, "s.inner.bounds=3 must be a list"),
    ],
)
def test_bad_values_name_the_key(patch, message):
    with pytest.raises(ParamsError) as err:
        load_section({"s": {**GOOD, **patch}}, "s", Section)
    assert message in str(err.value)


def test_missing_key_and_section():
    data = dict(GOOD)
    del data["name"]
    with pytest.raises(ParamsError, match=r"missing key\(s\) s.name"):
        load_section({"s": data}, "s", Section)
    with pytest.raises(ParamsError, match="section 's' is missing"):
        load_section({}, "s", Section)


def test_read_params_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        read_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="not valid YAML"):
        read_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load(listy, "s", Section)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}
