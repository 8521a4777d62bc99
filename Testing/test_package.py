"""The package as a user installs it (``pip install .``, not editable): the wheel ``python -m build``
makes holds both libraries and the bundled weights, and the installed command finds them from any
folder. The installed demo's accuracy is checked in test_bundled_weights.py."""

import subprocess
import sys
import zipfile

import pytest

from conftest import run_installed
from LiverTumorDARNLib.weights import bundled_models_dir

pytestmark = pytest.mark.slow


def test_the_wheel_holds_both_libraries_and_the_bundled_weights(installed_package):
    _, wheel = installed_package
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"LiverTumorDARNLib/cli.py", "LiverTumorDARNLib/training/loop.py", "LiverTumorDARNSceneLib/scene.py",
            "LiverTumorDARNSceneLib/tasks.py"} <= names
    assert {f"LiverTumorDARNLib/Models/{path.name}" for path in bundled_models_dir().iterdir()} <= names


def test_the_installed_package_takes_its_weights_from_the_install_not_the_checkout(installed_package, tmp_path):
    installed, _ = installed_package
    code = "from LiverTumorDARNLib.weights import bundled_models_dir; print(bundled_models_dir())"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(installed), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str((installed / "LiverTumorDARNLib" / "Models").resolve())


def test_the_installed_command_refuses_bad_input_in_one_line_from_another_folder(installed_package, tmp_path):
    installed, _ = installed_package
    done = run_installed(installed, "segment", "missing.nii.gz", "-o", "labels.nii.gz", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("livertumordarn: error: missing.nii.gz")
