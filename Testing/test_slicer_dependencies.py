"""What the Slicer module installs on first use: only what is missing, never a package Slicer ships."""

from __future__ import annotations

import importlib.metadata

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
