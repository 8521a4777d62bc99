"""What every test shares: one thread per process, tiny weights, small CT files.

Threads. Every test process, and every process a test starts (the Slicer worker, torchrun ranks,
case workers, an installed command), runs PyTorch and OpenMP on one thread. The tiny test networks
run fastest that way, and on a machine whose cores are busy, threads that wait for each other make
the suite several times slower. The setting is made
here, before torch is imported, and restored after each test, so that no test (training sets its
own thread count) passes its setting on to the next.

Weights. Tiny random weights exported as the real ones are (both DARN stages and the refinement
network). Random weights make the labels arbitrary but deterministic: the tests that use them check
files, grids, refusals and messages, never accuracy. Both stages work at 8 mm, on a patch that
covers a small phantom's width in one window (:data:`TINY_PATCH`), so that a small phantom is
segmented in one network pass, not the hundred and more of the stages' own patches (the
sliding window itself is tested in test_pipeline.py).
"""

import os

os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # noqa: E402  (before torch)

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from LiverTumorDARNLib.io import write_image  # noqa: E402
from LiverTumorDARNLib.models import build_model  # noqa: E402
from LiverTumorDARNLib.phantom import generate_case  # noqa: E402
from LiverTumorDARNLib.training.checkpoints import save_checkpoint  # noqa: E402
from LiverTumorDARNLib.weights import export_checkpoint  # noqa: E402

TINY = {"encoder_widths": (4, 8, 16), "pyramid_width": 4, "order": "spa_sem", "in_channels": 1}
TINY_SPACING_MM = 8.0
TINY_PATCH = (32, 56, 56)
"""(z, y, x): a small phantom (about 400 x 400 x 230 mm) at 8 mm fits one window, which the tiny
network runs in a fraction of a second on one thread."""
THREADS = 1

torch.set_num_threads(THREADS)


def pytest_collection_modifyitems(items):
    """The slow end-to-end tests first (a stable sort: each file's tests stay in their order), so
    that with one process per core (``./run tests``) the longest runs start at once and the many
    quick tests fill the processes to the end, instead of one process running the demo alone
    while the others wait."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def one_thread_after_each_test():
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for name, classes in (("liver", 2), ("tumor", 3)):
        config = {**TINY, "num_classes": classes}
        stage = {"name": name, "spacing_mm": (TINY_SPACING_MM,) * 3, "num_classes": classes, "patch_size": TINY_PATCH}
        checkpoint = save_checkpoint({"model": build_model(config).state_dict(), "model_config": config,
                                      "stage": stage}, folder / f"{name}.pt")
        export_checkpoint(checkpoint, folder, note="random weights for tests")
    refine = {"architecture": "refine", "widths": (4, 8)}
    checkpoint = save_checkpoint({"model": build_model(refine).state_dict(), "model_config": refine,
                                  "stage": {"name": "refine", "patch_size": [32] * 3, "num_classes": 2}},
                                 folder / "refine-checkpoint.pt")
    export_checkpoint(checkpoint, folder, note="random weights for tests")
    return folder


@pytest.fixture(scope="session")
def ct_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ct") / "case-7.nii.gz"
    write_image(generate_case(7, small=True).image, path)
    return path


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory):
    """The wheel ``python -m build`` makes of this checkout, installed without dependencies into a
    folder of its own (torch and the others come from the test environment): (folder, wheel)."""
    root = Path(__file__).resolve().parents[1]
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, source / name)
    shutil.copytree(root / "LiverTumorDARN", source / "LiverTumorDARN",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist, target = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("installed")
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)])
    (wheel,) = dist.glob("*.whl")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)])
    return target, wheel


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def run_installed(installed: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``livertumordarn`` command, run from ``cwd`` with only the installed copy of
    the libraries on the path (PYTHONPATH comes before the editable install of the checkout)."""
    return subprocess.run([str(installed / "bin" / "livertumordarn"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(installed)})
