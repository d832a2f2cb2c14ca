"""The public API: exported names exist and are documented; the core stays free of heavy deps."""

import importlib
import inspect
import subprocess
import sys

import pytest

import jaxdiff

CORE_MODULES = [
    "jaxdiff.processes",
    "jaxdiff.predictions",
    "jaxdiff.analytic",
    "jaxdiff.analysis",
    "jaxdiff.metrics",
    "jaxdiff.timesteps",
    "jaxdiff.samplers",
    "jaxdiff.losses",
    "jaxdiff.guidance",
    "jaxdiff.likelihood",
    "jaxdiff.fokker_planck",
    "jaxdiff.parallel",
]

UPPER_MODULES = [
    "jaxdiff.nets",
    "jaxdiff.training",
    "jaxdiff.data",
    "jaxdiff.data.toy2d",
    "jaxdiff.data.digits",
    "jaxdiff.data.tfds",
    "jaxdiff.data.pipeline",
]


@pytest.mark.parametrize("module_name", CORE_MODULES + UPPER_MODULES)
def test_every_public_name_exists_and_is_documented(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__ and module.__doc__.strip(), module_name
    assert module.__all__, module_name
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            doc = inspect.getdoc(obj)
            assert doc and len(doc.splitlines()[0]) > 10, f"{module_name}.{name} lacks a docstring"


def test_public_methods_of_classes_are_documented():
    from jaxdiff import analytic, processes

    for module in (processes, analytic):
        for name in module.__all__:
            cls = getattr(module, name)
            if not inspect.isclass(cls):
                continue
            for attr, member in inspect.getmembers(cls, inspect.isfunction):
                if attr.startswith("_"):
                    continue
                assert inspect.getdoc(member), f"{name}.{attr} lacks a docstring"


def test_top_level_reexports_are_the_module_objects():
    assert jaxdiff.VPProcess is jaxdiff.processes.VPProcess
    assert jaxdiff.convert is jaxdiff.predictions.convert
    assert jaxdiff.sample is jaxdiff.samplers.sample
    for name in jaxdiff.__all__:
        assert hasattr(jaxdiff, name), name


def test_core_does_not_import_training_dependencies():
    code = (
        "import sys, jaxdiff, jaxdiff.analytic, jaxdiff.analysis, jaxdiff.metrics, "
        "jaxdiff.samplers, jaxdiff.timesteps, jaxdiff.losses, jaxdiff.guidance, jaxdiff.parallel\n"
        "bad = [m for m in ('flax', 'optax', 'orbax', 'grain', 'tensorflow_datasets', "
        "'tensorflow', 'ml_collections', 'absl.flags') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"core imported: {out.stdout.strip()}"
