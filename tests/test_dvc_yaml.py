"""dvc.yaml lists every project module that can change a stage's outputs, and only those; the
train stage's params are exactly what a checkpoint's fingerprint covers."""

from __future__ import annotations

import ast
import re
import typing

import pytest
from helpers import ROOT, make_params, params_dict
from ruamel.yaml import YAML

from pipeline import checkpoint
from pipeline import params as P

# Modules a stage imports that cannot change its outputs, so they are no deps (editing them must
# not retrain anything):
CANNOT_CHANGE_OUTPUTS = {
    "pipeline.params": "validates params.yaml; every value comes from the file, a DVC param",
    "pipeline.stage": "folder names (dvc.yaml names the same folders) and error reporting",
    "pipeline.tf": "imports TensorFlow quietly",
    "pipeline.tracking": "MLflow only; no file DVC tracks",
    "pipeline.store": "where the MLflow store is; no file DVC tracks",
    "pipeline.checkpoint": "resume bookkeeping; a resumed run ends bit-identical (test_resume)",
}
# Files a stage uses without importing them.
# register: stored with the model as its code (pipeline/packaging.py)
NOT_IMPORTED = {"register": {"pipeline/image_model.py", "pipeline/images.py"}}
STAGES = YAML(typ="safe").load(ROOT / "dvc.yaml")["stages"]


def imports(module: str) -> set[str]:
    """The project modules `module` imports, directly or through other project modules."""
    found: set[str] = set()
    todo = [module]
    while todo:
        path = ROOT / (todo.pop().replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                known = (ROOT / (name.replace(".", "/") + ".py")).exists()
                if name.startswith("pipeline.") and known and name not in found:
                    found.add(name)
                    todo.append(name)
    return found


@pytest.mark.parametrize("name", list(STAGES))
def test_every_module_that_can_change_a_stage_output_is_a_dep(name: str) -> None:
    stage = STAGES[name]
    module = re.match(r"python -m (pipeline\.\w+)", stage["cmd"]).group(1)
    needed = {module} | imports(module)
    wanted = {m.replace(".", "/") + ".py" for m in needed - CANNOT_CHANGE_OUTPUTS.keys()}
    wanted |= NOT_IMPORTED.get(name, set())
    listed = {dep for dep in stage["deps"] if dep.startswith("pipeline/")}
    assert listed >= wanted, f"{name}: add to deps in dvc.yaml: {sorted(wanted - listed)}"
    assert listed <= wanted, f"{name}: deps it does not import: {sorted(listed - wanted)}"


def test_the_dependency_walk_follows_imports_through_other_modules() -> None:
    found = imports("pipeline.train")
    assert {"pipeline.model", "pipeline.fastrnn", "pipeline.io", "pipeline.tf"} <= found
    assert "pipeline.datasets" not in found and "pipeline.report" not in found


def other_value(section: type[P.BaseModel], field: str, value: object) -> object:
    """A different valid value for a param, to see whether the fingerprint notices."""
    annotation = section.model_fields[field].annotation
    literals = [
        a for arg in typing.get_args(annotation) or [annotation] for a in typing.get_args(arg)
    ]
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return next(v for v in literals or typing.get_args(annotation) if v != value)
    if value is None:
        return 1.0 if float in typing.get_args(annotation) else 4
    return value * 2 if isinstance(value, float) else value + 1


def test_the_fingerprint_covers_every_param_the_train_stage_depends_on() -> None:
    """A checkpoint resumes only for the same params: a key in dvc.yaml's train params that the
    fingerprint ignored would resume a run that DVC reruns because that key changed."""
    sections = STAGES["train"]["params"]
    assert sections == ["seed", "model", "train"]  # whole sections: a new key cannot be forgotten
    base = checkpoint.fingerprint(make_params(), "state_h", "0" * 64)
    for key in [k for k in P.Params().flat() if k.split(".")[0] in sections]:
        raw = params_dict()
        *path, field = key.split(".")
        node, model = raw, P.Params
        for part in path:
            node, model = node[part], model.model_fields[part].annotation
        node[field] = other_value(model, field, node[field])
        changed = checkpoint.fingerprint(P.parse(raw), "state_h", "0" * 64)
        assert changed != base, key
    not_train = make_params({"readouts": ["state_h"], "data": {"val_size": 0.2}})
    assert checkpoint.fingerprint(not_train, "state_h", "0" * 64) == base
    assert checkpoint.fingerprint(make_params(), "output_last", "0" * 64) != base
    assert checkpoint.fingerprint(make_params(), "state_h", "1" * 64) != base
