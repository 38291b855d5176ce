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
    "export": ("audiocnn.export", "ExportParams"),
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


def audiocnn_imports(path) -> set[str]:
    """audiocnn modules a file imports (anywhere in it, lazy imports included)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "audiocnn":
            if node.module == "audiocnn":
                found.update(f"audiocnn.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "audiocnn")
    return {name for name in found if (REPO / "src" / (name.replace(".", "/") + ".py")).is_file()}


@pytest.mark.parametrize("stage", sorted(declared_params()))
def test_stage_deps_list_every_module_it_imports(stage):
    """A library change must rerun every stage that runs that code (dvc.yaml deps)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    deps = set(dvc["stages"][stage]["deps"])
    todo, seen = [REPO / "stages" / f"{stage}.py"], set()
    while todo:
        for module in audiocnn_imports(todo.pop()) - seen:
            seen.add(module)
            todo.append(REPO / "src" / (module.replace(".", "/") + ".py"))
    needed = {"src/" + m.replace(".", "/") + ".py" for m in seen}
    assert f"stages/{stage}.py" in deps
    assert not needed - deps, f"dvc.yaml stage {stage} misses deps: {sorted(needed - deps)}"
