"""What the Slicer module installs on first use, and what it must leave alone.

PyTorch comes from Slicer's PyTorch extension, whose PyTorchUtils picks a build for the machine's
GPU; the packages of ``Resources/requirements.txt`` come from pip. Neither may replace a package
that Slicer ships (numpy, SimpleITK, vtk, ...): Slicer and its other extensions are built against
those. So pip gets the installed versions of them as constraints: it then picks versions of our
packages that fit them, or fails, but never upgrades them.

Only the two ``ensure_`` functions reach into the application (the PyTorch extension, Slicer's pip
helpers, a confirmation dialog), and they import it where they need it: the rest is plain Python,
and CI tests all of it that does not need the application. ``packaging`` ships with Slicer
(``SuperBuild/External_python-packaging.cmake``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import sys
from pathlib import Path
from typing import Callable

from packaging.requirements import Requirement

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


def torch_needs_installing(requirement: str = TORCH_REQUIREMENT) -> bool:
    """Whether PyTorch must be installed: it is not, or its version is outside ``requirement``
    (an older torch is upgraded, not kept because it imports)."""
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return True
    return not Requirement("torch" + requirement).specifier.contains(installed, prereleases=True)


def pip_ensure_options(pip_ensure: Callable) -> dict:
    """Keyword arguments for Slicer's ``pip_ensure`` that make it install even under ``--testing``.

    Slicer 5.12 and newer skip the install in testing mode by default (``skip_in_testing``), and the
    module's own test then fails on the first missing package. A ``pip_ensure`` without that option
    gets none.
    """
    return {"skip_in_testing": False} if "skip_in_testing" in inspect.signature(pip_ensure).parameters else {}


def ensure_pytorch() -> None:
    """Have the PyTorch extension install PyTorch (a build that fits this machine's GPU) when it is
    missing or older than :data:`TORCH_REQUIREMENT`, after the user agrees."""
    if not torch_needs_installing():
        return
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError('Liver Tumor DARN needs the PyTorch extension: install "PyTorch" from the '
                           "Extensions Manager, restart Slicer and try again.") from None
    loaded = "torch" in sys.modules
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is None:
        raise RuntimeError(f"PyTorch {TORCH_REQUIREMENT} was not installed; Liver Tumor DARN needs it.")
    if loaded:
        raise RuntimeError("PyTorch was upgraded; restart Slicer to use the new version.")


def ensure_python_requirements(requirements_path: Path, constraints_path: Path) -> None:
    """Install the requirements that are missing, after asking once, with the packages Slicer ships
    pinned (:func:`write_constraints`): through Slicer's ``pip_ensure`` where it has one, else
    through ``slicer.util.pip_install`` after a confirmation."""
    write_constraints(constraints_path)
    pip = slicer_pip_ensure_module()
    if pip is not None:
        pip.pip_ensure(pip.load_requirements(requirements_path), constraints=constraints_path,
                       requester="Liver Tumor DARN", **pip_ensure_options(pip.pip_ensure))
        return
    missing = missing_requirements(read_requirements(requirements_path))
    if not missing:
        return
    import slicer.util

    if not slicer.util.confirmOkCancelDisplay(f"Liver Tumor DARN needs these Python packages: {', '.join(missing)}. "
                                              f"Install them now?"):
        raise RuntimeError("The required Python packages are not installed.")
    slicer.util.pip_install(missing + ["-c", str(constraints_path)])


def slicer_pip_ensure_module():
    """Slicer's module with ``pip_ensure`` and ``load_requirements`` (``slicer.packaging``, called
    ``slicer.pydeps`` in some 5.11 previews), or None in releases that have neither (5.8 and 5.10)."""
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module
    return None
