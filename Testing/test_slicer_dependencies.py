"""What the Slicer module installs on first use: only what is missing or too old, never a package Slicer ships,
also when Slicer runs the module's own test."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from LiverTumorDARNSceneLib import dependencies


def test_the_constraints_pin_each_installed_package_slicer_ships_to_its_installed_version(tmp_path):
    path = dependencies.write_constraints(tmp_path / "constraints.txt", ("numpy", "SimpleITK"))
    assert path.read_text().splitlines() == [f"numpy=={importlib.metadata.version('numpy')}",
                                             f"SimpleITK=={importlib.metadata.version('SimpleITK')}"]


def test_a_shipped_package_that_is_not_installed_is_not_pinned(tmp_path):
    path = dependencies.write_constraints(tmp_path / "constraints.txt", ("numpy", "no-such-distribution-here"))
    assert [line.split("==")[0] for line in path.read_text().splitlines()] == ["numpy"]


def test_only_the_requirements_not_installed_are_missing(tmp_path):
    (tmp_path / "requirements.txt").write_text("# a comment\nnumpy>=1.0\n\nno-such-distribution-here>=2\n")
    requirements = dependencies.read_requirements(tmp_path / "requirements.txt")
    assert requirements == ["numpy>=1.0", "no-such-distribution-here>=2"]
    assert dependencies.missing_requirements(requirements) == ["no-such-distribution-here>=2"]


@pytest.fixture
def installed_torch(monkeypatch):
    """Pretend an installed torch of a given version (None: not installed)."""
    def pretend(version):
        def torch_version(name):
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        monkeypatch.setattr(importlib.metadata, "version", torch_version)
    return pretend


class PyTorchExtension:
    """Stands in for the PyTorch extension's PyTorchUtils module; records what it is asked to install."""

    def __init__(self):
        self.asked = []
        extension = self

        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
                extension.asked.append((askConfirmation, torchVersionRequirement))
                return object()

        self.PyTorchUtilsLogic = PyTorchUtilsLogic


@pytest.mark.parametrize("version, needed", [(None, True), ("2.0.1", True), ("2.1.0", False), ("2.13.0+cpu", False)])
def test_torch_is_installed_when_missing_or_older_than_the_core_needs(installed_torch, version, needed):
    installed_torch(version)
    assert dependencies.torch_needs_installing() is needed


def test_an_old_torch_is_upgraded_through_the_pytorch_extension_and_a_restart_asked_for(installed_torch, monkeypatch):
    installed_torch("1.13.1")
    extension = PyTorchExtension()
    monkeypatch.setitem(sys.modules, "PyTorchUtils", extension)
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch", object()))  # the old one is loaded
    with pytest.raises(RuntimeError, match="restart Slicer"):
        dependencies.ensure_pytorch()
    assert extension.asked == [(True, dependencies.TORCH_REQUIREMENT)]


def test_a_torch_that_fits_is_left_alone(installed_torch, monkeypatch):
    installed_torch("2.13.0")
    extension = PyTorchExtension()
    monkeypatch.setitem(sys.modules, "PyTorchUtils", extension)
    dependencies.ensure_pytorch()
    assert extension.asked == []


class SlicerPackaging:
    """Stands in for slicer.packaging of Slicer 5.12 and newer: its pip_ensure skips installs under
    --testing unless told otherwise."""

    def __init__(self):
        self.ensured = []

    @staticmethod
    def load_requirements(path):
        return dependencies.read_requirements(path)

    def pip_ensure(self, requirements, constraints=None, skip_packages=None, prompt_install=True,
                   prompt_restart=True, requester=None, skip_in_testing=True, show_progress=True):
        self.ensured.append({"requirements": requirements, "constraints": constraints, "skip_in_testing": skip_in_testing})


def test_slicer_installs_the_requirements_even_when_it_runs_the_modules_test(tmp_path, monkeypatch):
    pytest.importorskip("slicer", reason="slicer-core, the parent package of slicer.packaging")

    packaging = SlicerPackaging()
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    (tmp_path / "requirements.txt").write_text("connected-components-3d>=3.12\n")
    dependencies.ensure_python_requirements(tmp_path / "requirements.txt", tmp_path / "constraints.txt")
    assert packaging.ensured == [{"requirements": ["connected-components-3d>=3.12"],
                                  "constraints": tmp_path / "constraints.txt", "skip_in_testing": False}]
    assert (tmp_path / "constraints.txt").read_text().startswith("numpy==")


def test_a_pip_ensure_without_the_testing_switch_is_called_without_it():
    def pip_ensure(requirements, constraints=None, requester=None):
        return None

    assert dependencies.pip_ensure_options(pip_ensure) == {}
