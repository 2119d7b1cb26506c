"""docs/design.md's rules of who may import whom, checked in fresh interpreters and in the source;
and one name for one method everywhere (file, registry key, YAML)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_methods_know_nothing_of_tracking_or_the_cli():
    loaded = modules_after("import methods; methods.list_methods()")
    assert "mlflow" not in loaded
    assert "bench" not in loaded  # methods never import the harness


def test_reports_never_import_torch():
    assert "torch" not in modules_after("import reports, reports.__main__")


def imports_of(folder: str) -> dict[str, set[str]]:
    found = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path.name] = names
    return found


@pytest.mark.parametrize("forbidden", ["mlflow", "yaml", "bench", "argparse", "reports"])
def test_method_sources_stay_in_their_room(forbidden):
    offenders = [name for name, mods in imports_of("methods").items() if forbidden in mods]
    assert not offenders, f"methods/{offenders} import {forbidden}"


def test_bench_never_branches_on_a_method_name():
    import methods

    names = set(methods.list_methods())
    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                text = " ".join(ast.unparse(s) for s in sides if not isinstance(s, ast.Constant))
                if "method" not in text and "name" not in text:
                    continue  # e.g. tuning.sampler == "random" is not a method name
                for side in sides:
                    if isinstance(side, ast.Constant) and side.value in names:
                        offenders.append(f"{path.name}:{node.lineno} compares with {side.value!r}")
    assert not offenders, offenders


def test_one_name_everywhere():
    """Registry key == file name, both ways (random_pruning.py is the one exception: random.py
    would shadow the standard library's random for scripts run from methods/)."""
    import methods
    from methods.base import get_method_class

    modules = [get_method_class(name).__module__ for name in methods.list_methods()]
    assert len(set(modules)) == len(modules), "one file registers one method"
    registered = dict(zip(modules, methods.list_methods()))
    for path in sorted((ROOT / "methods").glob("*.py")):
        if path.stem.startswith("_") or path.stem == "base":
            continue
        name = registered.get(f"methods.{path.stem}")
        assert name is not None, f"methods/{path.name} registers no method"
        assert name == path.stem or (name, path.stem) == ("random", "random_pruning")
    for module, name in registered.items():
        assert module.startswith("methods."), f"{name!r} is registered by {module}, not methods/"


def test_every_method_a_study_names_is_registered():
    """What sweeps/*.yaml name (methods, method_args, the reference rows) exists; a new method
    needs no YAML edit (quickstart lists the studies' methods, not necessarily every one)."""
    import yaml

    import methods
    from bench.study import list_studies, load_study

    registered = set(methods.list_methods())
    for study_name in list_studies():
        study = load_study(study_name)
        named = set(study.methods) | set(study.method_args)
        assert named <= registered, f"sweeps/{study_name}.yaml names {sorted(named - registered)}"
    reference = yaml.safe_load((ROOT / "sweeps" / "reference.yaml").read_text())
    named = {row["method"] for row in reference}
    assert named <= registered, f"sweeps/reference.yaml names {sorted(named - registered)}"


def test_names_known_without_torch_are_the_registries():
    """bench.names answers command lines before torch is imported: its method names (read from
    methods/*.py) and CIFAR models are what the registries hold."""
    import methods
    from bench import models, names

    assert list(names._package_methods()) == methods.list_methods()
    assert models.list_cifar_models() == sorted(names.CIFAR_MODELS)
    with pytest.raises(models.ModelError, match="CIFAR_MODELS"):
        models._entrypoint("unlisted_cifar", models.CifarVGG, "not in bench.names")
