"""The Slicer extension's files agree with each other; read as text, no Slicer needed.

3D Slicer only installs what LiverTumorDARN/CMakeLists.txt lists, and only finds widgets that
the .ui file declares, so a forgotten line there breaks the module in the application while
every core test still passes. These tests catch that here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import py_compile
import re
import subprocess
import sys
from pathlib import Path

import pytest

from LiverTumorDARNSceneLib import dependencies

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "LiverTumorDARN"
MODULE_SCRIPT = MODULE_DIR / "LiverTumorDARN.py"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
CORE_DIR = MODULE_DIR / "LiverTumorDARNLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LiverTumorDARN.ui"
ROOT_CMAKE = ROOT / "CMakeLists.txt"
INDEX_ENTRY = ROOT / "LiverTumorDARN.json"

EXTENSION_METADATA_KEYS = (
    "EXTENSION_HOMEPAGE",
    "EXTENSION_CONTRIBUTORS",
    "EXTENSION_DESCRIPTION",
    "EXTENSION_ICONURL",
    "EXTENSION_SCREENSHOTURLS",
    "EXTENSION_DEPENDS",
)
NOT_INSTALLED = {".gitkeep", "README.md"}


def _module_cmake_entries() -> set[str]:
    """Paths listed in the module's CMakeLists.txt, relative to the module folder."""
    text = MODULE_CMAKE.read_text()
    text = text.replace("${MODULE_NAME}", "LiverTumorDARN")
    return set(re.findall(r"^\s*([\w./-]+\.\w+)\s*$", text, flags=re.MULTILINE))


def _relative(path: Path) -> str:
    return path.relative_to(MODULE_DIR).as_posix()


def _module_python_files() -> list[Path]:
    return sorted(p for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def _cmake_set(name: str) -> str | None:
    match = re.search(rf'^\s*set\(\s*{name}\s+"([^"]*)"', ROOT_CMAKE.read_text(), flags=re.MULTILINE)
    return match.group(1) if match else None


def test_every_python_file_of_the_module_is_listed_in_its_cmakelists():
    listed = _module_cmake_entries()
    missing = [_relative(p) for p in _module_python_files() if _relative(p) not in listed]
    assert not missing, f"not in MODULE_PYTHON_SCRIPTS of {MODULE_CMAKE.name}: {missing}"


def test_every_file_listed_in_the_module_cmakelists_exists():
    absent = sorted(entry for entry in _module_cmake_entries() if not (MODULE_DIR / entry).is_file())
    assert not absent, f"listed in {MODULE_CMAKE.name} but missing: {absent}"


def test_every_resource_file_is_listed_in_the_module_cmakelists():
    listed = _module_cmake_entries()
    resources = [p for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file() and p.name not in NOT_INSTALLED]
    missing = [_relative(p) for p in resources if _relative(p) not in listed]
    assert not missing, f"not in MODULE_PYTHON_RESOURCES of {MODULE_CMAKE.name}: {missing}"


def test_every_widget_the_module_uses_is_declared_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SCRIPT.read_text()))
    declared = set(re.findall(r'name="(\w+)"', UI_FILE.read_text()))
    assert used, "the module uses no widget from the .ui file"
    assert used <= declared, f"used as self.ui.<name> but not in {UI_FILE.name}: {sorted(used - declared)}"


def test_every_parameter_the_ui_file_binds_is_a_field_of_the_parameter_node():
    """connectGui stops at a SlicerParameterName that the parameter node class does not declare."""
    text = MODULE_SCRIPT.read_text()
    body = text[text.index("class LiverTumorDARNParameterNode:"):text.index("class LiverTumorDARNWidget")]
    fields = set(re.findall(r"^    (\w+): ", body, flags=re.MULTILINE))
    bound = set(re.findall(r'name="SlicerParameterName"[^>]*>\s*<string>(\w+)</string>', UI_FILE.read_text()))
    assert bound, "the .ui file binds no widget to the parameter node"
    assert bound <= fields, f"bound in {UI_FILE.name} but not parameter node fields: {sorted(bound - fields)}"


def test_the_sample_data_entry_has_its_thumbnail_in_the_modules_icons():
    match = re.search(r'^SAMPLE_NAME = "(\w+)"', MODULE_SCRIPT.read_text(), flags=re.MULTILINE)
    assert match, "the module script names no SAMPLE_NAME"
    assert (MODULE_DIR / "Resources" / "Icons" / f"{match.group(1)}.png").is_file()


def _draw_panel_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("draw_panel", ROOT / "tools" / "draw_panel.py")
    draw_panel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(draw_panel)
    return draw_panel


def test_the_readmes_panel_picture_is_drawn_from_the_current_ui_file():
    """tools/draw_panel.py draws every widget class the .ui file uses, and the committed picture
    has the height it draws now (a row added to the .ui file without redrawing would change it)."""
    from PIL import Image

    draw_panel = _draw_panel_tool()
    used = set(re.findall(r'<widget class="(\w+)"', UI_FILE.read_text())) - {"qMRMLWidget"}
    assert used <= draw_panel.WIDGETS.keys(), f"draw_panel.py cannot draw {sorted(used - draw_panel.WIDGETS.keys())}"
    with Image.open(draw_panel.OUTPUT) as committed:
        assert draw_panel.draw_panel().size == committed.size, "redraw it: .venv/bin/python tools/draw_panel.py"


def test_the_extensions_screenshot_is_the_panel_beside_the_demos_result():
    """Not a copy of another picture: the committed panel and demo pictures, put side by side."""
    import numpy as np
    from PIL import Image

    draw_panel = _draw_panel_tool()
    with Image.open(draw_panel.OUTPUT) as panel, Image.open(draw_panel.DEMO_PICTURE) as result, \
            Image.open(draw_panel.SCREENSHOT) as committed:
        np.testing.assert_array_equal(np.asarray(committed.convert("RGB")), np.asarray(draw_panel.screenshot(panel, result)))
    assert (ROOT / "Resources" / "Screenshot.png").read_bytes() != (ROOT / "Resources" / "phantoms.png").read_bytes()


def test_the_module_script_compiles(tmp_path):
    py_compile.compile(str(MODULE_SCRIPT), cfile=str(tmp_path / "module.pyc"), doraise=True)


@pytest.mark.parametrize("path", _module_python_files(), ids=_relative)
def test_every_file_slicer_loads_is_python_3_9(path):
    """Slicer 5.8 runs Python 3.9: no match statement, no other 3.10+ grammar."""
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def test_the_module_script_loads_light_before_its_first_use_installs_anything():
    """Slicer imports every module at start-up, when torch (PyTorch extension) and the pip
    requirements may not be installed yet, and every start waits for what it imports: what the
    script imports at its top must need neither those nor scipy and SimpleITK."""
    imported = re.findall(r"^from (LiverTumorDARN(?:Scene)?Lib\.\w+) import", MODULE_SCRIPT.read_text(), flags=re.MULTILINE)
    assert imported, "the check needs the script's top-level imports of the core"
    not_at_start = {"torch", "cc3d", "tqdm", "scipy", "SimpleITK"}
    code = "; ".join(["import sys", *(f"import {name}" for name in imported),
                      f"print(sorted({not_at_start!r} & sys.modules.keys()))"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(MODULE_DIR)})
    assert done.stdout.strip() == "[]"


def test_the_module_scripts_sample_seed_is_the_phantoms_and_the_panels():
    from LiverTumorDARNLib.phantom import SAMPLE_SEED

    match = re.search(r"^SAMPLE_SEED = (\d+)$", MODULE_SCRIPT.read_text(), flags=re.MULTILINE)
    spin_box = re.search(r'name="phantomSeedSpinBox".*?<property name="value">\s*<number>(\d+)</number>',
                         UI_FILE.read_text(), flags=re.DOTALL)
    assert int(match.group(1)) == int(spin_box.group(1)) == SAMPLE_SEED


def test_the_extension_project_name_matches_the_index_entry_file_name():
    match = re.search(r"^\s*project\(\s*(\w+)", ROOT_CMAKE.read_text(), flags=re.MULTILINE)
    assert match, "no project() in the root CMakeLists.txt"
    assert match.group(1) == INDEX_ENTRY.stem


def test_the_index_entry_has_the_required_keys_category_and_pytorch_dependency():
    entry = json.loads(INDEX_ENTRY.read_text())
    assert {"$schema", "category", "scm_url"} <= entry.keys()
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    assert entry["category"] == "Segmentation"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"] == _cmake_set("EXTENSION_HOMEPAGE")


def test_the_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


@pytest.mark.parametrize("key", EXTENSION_METADATA_KEYS)
def test_the_root_cmakelists_sets_each_extension_metadata_key(key):
    value = _cmake_set(key)
    assert value, f"{key} is not set in the root CMakeLists.txt"


def test_the_extension_depends_on_pytorch():
    assert _cmake_set("EXTENSION_DEPENDS") == "PyTorch"


@pytest.mark.parametrize("path", sorted(CORE_DIR.rglob("*.py")), ids=lambda p: p.relative_to(CORE_DIR).as_posix())
def test_the_core_package_never_imports_slicer_qt_ctk_or_vtk(path):
    gui_import = re.compile(r"^\s*(?:import|from)\s+(slicer|qt|ctk|vtk|vtkmodules|__main__)\b", flags=re.MULTILINE)
    found = gui_import.findall(path.read_text())
    assert not found, f"{path.name} imports {found}: the core must run without Slicer"


SHIPPED_WITH_SLICER = {name.lower() for name in dependencies.SHIPPED_WITH_SLICER}
COMMAND_LINE_ONLY = {"highdicom", "slicerio", "tqdm"}  # DICOM SEG, .seg.nrrd (Slicer writes them), progress bars


def _requirement_names(requirements) -> set[str]:
    return {dependencies.requirement_name(requirement).lower() for requirement in requirements}


def _core_dependencies() -> list[str]:
    """The installed package's dependencies (pyproject.toml's, read back without tomllib: Python 3.9)."""
    return [line for line in importlib.metadata.requires("livertumordarn") if "extra ==" not in line]


def test_the_torch_version_asked_of_the_pytorch_extension_is_the_cores():
    (torch,) = [line for line in _core_dependencies() if dependencies.requirement_name(line) == "torch"]
    assert torch == "torch" + dependencies.TORCH_REQUIREMENT


def test_slicer_requirements_are_the_core_dependencies_slicer_does_not_ship():
    core = _requirement_names(_core_dependencies())
    slicer_side = _requirement_names(dependencies.read_requirements(MODULE_DIR / "Resources" / "requirements.txt"))
    assert slicer_side == core - SHIPPED_WITH_SLICER - COMMAND_LINE_ONLY
