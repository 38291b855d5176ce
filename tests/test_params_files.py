"""params.yaml and dvc.yaml agree: every declared param exists, every section validates, none is dead."""

from __future__ import annotations

import importlib

import pytest
import yaml

from audiocnn.config import load_section
from conftest import REPO, real_params

# params.yaml section -> (module, dataclass) that validates it at stage start.
SECTIONS = {
    "audio": ("audiocnn.audio", "AudioParams"),
    "demo": ("audiocnn.demo", "DemoParams"),
    "ingest": ("audiocnn.ingest", "IngestParams"),
    "normalize": ("audiocnn.normalize", "NormalizeParams"),
    "spectrogram": ("audiocnn.spectrogram", "SpectrogramParams"),
    "split": ("audiocnn.split", "SplitParams"),
    "model": ("audiocnn.models", "ModelParams"),
    "train": ("audiocnn.train", "TrainParams"),
    "evaluate": ("audiocnn.evaluate", "EvaluateParams"),
}


def declared_params() -> dict[str, list[str]]:
    """Stage -> the params keys dvc.yaml lists for it."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    return {name: list(stage.get("params", [])) for name, stage in dvc["stages"].items()}


def lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"dvc.yaml declares '{dotted}', missing from params.yaml"
        node = node[part]
    return node


def test_every_declared_param_exists():
    params = real_params()
    for stage, keys in declared_params().items():
        for key in keys:
            lookup(params, key)


def test_every_section_is_read_by_a_stage():
    used = {key.split(".")[0] for keys in declared_params().values() for key in keys}
    assert set(real_params()) == used


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_section_validates(section):
    module, cls = SECTIONS[section]
    config = load_section(real_params(), section, getattr(importlib.import_module(module), cls))
    assert config is not None


def test_all_sections_have_a_validator():
    assert set(real_params()) == set(SECTIONS)
