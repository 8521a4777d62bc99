"""What the Slicer module installs on first use, and what it must leave alone.

PyTorch comes from Slicer's PyTorch extension, whose PyTorchUtils picks a build for the machine's
GPU; the packages of ``Resources/requirements.txt`` come from pip. Neither may replace a package
that Slicer ships (numpy, SimpleITK, vtk, ...): Slicer and its other extensions are built against
those. So pip gets the installed versions of them as constraints: it then picks versions of our
packages that fit them, or fails, but never upgrades them.

Plain Python (no slicer, no Qt), so CI tests it.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

TORCH_REQUIREMENT = ">=2.1"
"""The torch versions the core works with (as in pyproject.toml), asked of the PyTorch extension."""

SHIPPED_WITH_SLICER = ("numpy", "scipy", "SimpleITK", "vtk", "pydicom", "torch")
"""Packages Slicer (torch: its PyTorch extension) provides; pip must never replace them."""


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement line ("tqdm>=4.60" -> "tqdm")."""
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]


def read_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements.txt (no comments, no blank lines)."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements whose distribution is not installed at all."""
    missing = []
    for requirement in requirements:
        try:
            importlib.metadata.distribution(requirement_name(requirement))
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


def write_constraints(path: Path, names: tuple[str, ...] = SHIPPED_WITH_SLICER) -> Path:
    """A pip constraints file that pins each of ``names`` that is installed to its installed version."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    Path(path).write_text("".join(pin + "\n" for pin in pins))
    return Path(path)
