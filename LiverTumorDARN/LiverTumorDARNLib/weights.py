"""The bundled network weights: TorchScript files plus a manifest that says what each one is.

``Resources/Models/manifest.json`` (format 1)::

    {"format": 1,
     "intended_use": "trained on synthetic phantoms, ...",
     "models": {"liver": {"file": "darn-liver.pt", "sha256": "...", "bytes": n,
                          "model": {DARN constructor arguments},
                          "stage": {StageSpec fields},
                          "training": {data, iterations, machine, command, ...},
                          "metrics": {...}},
                "tumor": {..., "postprocessing": {"min_tumor_confidence": 0.75, "chosen_on": "..."}}}}

Why it is built this way:
- Inference loads only TorchScript (``torch.jit.load``), never the Python model class, so a
  weights file runs with whatever version of ``models.py`` is installed next to it.
- ``torch.jit.load`` unpickles, so a replaced file could run code: the SHA-256 from the manifest
  is checked *before* loading, and a mismatch is refused. It also catches truncated downloads
  and Git LFS pointer files in place of the weights.
- Files are capped at :data:`MAX_MODEL_BYTES` because they ship inside the extension package.
- The manifest keeps the architecture and the training record, so anyone can see what a file
  was trained on and rebuild it.
- The tumor entry's ``postprocessing`` is calibrated for that file on validation cases
  (``tools/calibrate_tumor_confidence.py``), so exporting new tumor weights drops it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # torch and SimpleITK (io) are imported where they are used: the Slicer module reads this at start-up
    import torch

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
INTENDED_USE = ("trained on synthetic phantoms, for demonstration and research; "
                "train on real data before any other use")
MAX_MODEL_BYTES = 16 * 1024 * 1024
"""Largest weights file that may be bundled with the extension."""
MAX_REFINE_MODEL_BYTES = 8 * 1024 * 1024
"""The refinement network is loaded for every click session: it is kept smaller."""

_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def bundled_models_dir() -> Path:
    """The bundled weights: ``Models`` inside the package where a wheel installed it, else
    ``Resources/Models`` of the Slicer module next to the package (the source tree, an editable
    install, the Slicer extension)."""
    package = Path(__file__).resolve().parent
    installed = package / "Models"
    return installed if installed.is_dir() else package.parent / "Resources" / "Models"


def load_manifest(models_dir: Path) -> dict:
    """The manifest of a models folder; InputError when it is missing or not format 1."""
    path = Path(models_dir) / MANIFEST_NAME
    if path.exists() and not path.is_file():  # a pipe would block the read
        raise InputError(f"{path}: not a regular file; a weights manifest is a JSON file")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no weights manifest; the models folder has no trained weights") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable weights manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("models"), dict):
        raise InputError(f"{path}: not a format-{MANIFEST_FORMAT} weights manifest (needs \"format\": {MANIFEST_FORMAT} and a \"models\" object)")
    return manifest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(models_dir: Path, name: str, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """The TorchScript model ``name`` of the manifest, in eval mode on ``device``, and its entry.

    The file must lie in ``models_dir`` and its SHA-256 match the manifest before it is loaded (see
    the module docstring).
    """
    import torch

    models = load_manifest(models_dir)["models"]
    path = _verified_file(Path(models_dir), models, name)
    try:
        module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a TorchScript file PyTorch can load ({reason}); export the weights again") from None
    module.eval()
    return module, models[name]


def _verified_file(models_dir: Path, models: dict, name: str) -> Path:
    """The weights file of manifest entry ``name``, once it is known to be there and unchanged."""
    manifest = models_dir / MANIFEST_NAME
    if name not in models:
        raise InputError(f"{manifest}: no model {name!r}; it lists {', '.join(sorted(models)) or 'none'}")
    entry = models[name]
    if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in ("file", "sha256")):
        raise InputError(f"{manifest}: the {name!r} entry needs a \"file\" and its \"sha256\"; "
                         f"without a checksum the weights cannot be trusted")
    path = _inside(models_dir, entry["file"], manifest)
    if not path.exists():
        raise InputError(f"{path}: weights file named in the manifest is missing")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (a folder, pipe or device); the manifest must name a weights file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: weights file is empty (0 bytes); copy or export the weights again")
    actual = file_sha256(path)
    if actual != entry["sha256"]:
        raise InputError(f"{path}: checksum mismatch: expected {entry['sha256']}, got {actual}; the file is corrupt or was replaced")
    return path


def _inside(models_dir: Path, name: str, manifest: Path) -> Path:
    """The file a manifest names, refused unless it lies in the models folder (no "..", no absolute
    path, no link leading out): the folder, as checked and handed over, is the unit of trust."""
    path = models_dir / name
    if models_dir.resolve() not in path.resolve().parents:
        raise InputError(f"{manifest}: the file {name!r} lies outside the models folder {models_dir}; "
                         f"a manifest may name only files in its own folder")
    return path


BUNDLED, CUSTOM = "bundled", "custom"
MODEL_SOURCES = (BUNDLED, CUSTOM)
"""Where the Slicer panel takes its weights from: the bundled folder, or a folder the user chose."""

SEGMENTATION_MODELS = ("liver", "tumor")
"""The manifest entries that segmenting needs (refinement also needs "refine")."""

ORDER_NAMES = {"spa_sem": "Spa+Sem", "sem_spa": "Sem+Spa"}
"""The paper's names for DARN's two refinement orders."""


def chosen_models_dir(source: str, custom_dir: str | Path = "") -> Path:
    """The weights folder the user chose, checked now (manifest, files, checksums), so that a wrong
    folder is refused in one line when the user presses a button, not deep inside the worker."""
    if source == BUNDLED:
        folder = bundled_models_dir()
    elif source == CUSTOM:
        if str(custom_dir).strip() in ("", "."):
            raise InputError("no custom weights folder chosen; choose a folder with manifest.json and its "
                             "TorchScript files (as 'livertumordarn export' writes them)")
        folder = Path(custom_dir)
    else:
        raise InputError(f"unknown model source {source!r}; expected one of {', '.join(MODEL_SOURCES)}")
    models = load_manifest(folder)["models"]
    for name in SEGMENTATION_MODELS:
        _verified_file(folder, models, name)
    return folder


def describe_models(models_dir: Path) -> str:
    """What a weights folder holds, in a few words for a menu: "DARN Spa+Sem" (the stages' order)."""
    models = load_manifest(models_dir)["models"]
    orders = {ORDER_NAMES.get(models[name]["model"].get("order"), "unknown order")
              for name in SEGMENTATION_MODELS if name in models}
    return "DARN " + " / ".join(sorted(orders))


def export_checkpoint(checkpoint: Path, models_dir: Path, note: str = "", overwrite: bool = False) -> Path:
    """Turn a training checkpoint into ``models_dir/darn-{stage}.pt`` (or ``refine.pt``) and its
    manifest entry.

    The training record and the validation scores come from the checkpoint itself, so the
    manifest says what the run really was; ``note`` adds what the checkpoint cannot know (the
    machine, the wall time). An exported DARN has no deep-supervision heads (inference never
    uses them). Other entries of the manifest are kept; both files are written atomically.
    Returns the weights file's path.
    """
    from .io import check_outputs_apart, write_json
    from .models import build_model

    models_dir = Path(models_dir)
    payload = read_checkpoint(Path(checkpoint))
    name = payload["stage"]["name"]
    if not _MODEL_NAME.match(name):
        raise InputError(f"{checkpoint}: stage name {name!r} is not a model name (lower-case letters, digits, '-' and '_')")
    is_darn = payload["model_config"].get("architecture", "darn") == "darn"
    target = models_dir / (f"darn-{name}.pt" if is_darn else f"{name}.pt")
    check_outputs_apart([target], [checkpoint])
    if target.exists() and not overwrite:
        raise InputError(f"{target} exists; allow overwriting to replace it", option="overwrite")
    architecture = {**payload["model_config"], "deep_supervision": False} if is_darn else dict(payload["model_config"])
    model = build_model(architecture)
    model.load_state_dict({key: value for key, value in payload["model"].items()
                           if not key.startswith("auxiliary_heads.")})
    if not is_darn:  # the runtime gives the clicks only to a network whose entry declares them
        architecture["in_channels"] = model.in_channels
    _export_within_limit(model, target, MAX_MODEL_BYTES if is_darn else MAX_REFINE_MODEL_BYTES, overwrite)
    manifest = _manifest_or_new(models_dir)
    manifest["models"][name] = {
        "file": target.name, "sha256": file_sha256(target), "bytes": target.stat().st_size,
        "model": {key: list(value) if isinstance(value, tuple) else value for key, value in architecture.items()},
        "stage": payload["stage"], "training": _training_record(payload, note),
        "metrics": {"validation_dice": payload.get("val_scores")},
    }
    write_json(manifest, models_dir / MANIFEST_NAME, overwrite=True)
    return target


def _training_record(payload: dict, note: str) -> dict:
    config = payload.get("config") or {}
    record = {}
    if config.get("data"):
        data = f"LiTS-layout folder {Path(config['data']).name}"
    elif config.get("anatomy"):
        from .anatomy import label_map_sources

        sources = label_map_sources(Path(config["anatomy"]))
        data = (f"synthetic CT drawn on the fly on real label maps ({', '.join(sources) or Path(config['anatomy']).name}; "
                f"every tenth map of each held out for validation), {config.get('phantom_fraction')} of the cases phantoms; "
                f"{config.get('randomize_fraction')} of them domain-randomised")
        record["label_map_licences"] = sources
    elif config:
        data = (f"synthetic phantoms drawn on the fly ({'small, ~4 mm' if config.get('phantom_small') else 'full-size 512x512'}; "
                f"seeds from {config.get('phantom_seed_start')}; {config.get('randomize_fraction')} of them domain-randomised)")
    else:
        data = None
    return {"data": data, **record, "iterations": payload.get("iteration"), "config": config or None, "note": note}


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by training (tensors and plain data only: nothing is unpickled as code)."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no such checkpoint") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise InputError(f"{path}: not a readable training checkpoint ({type(error).__name__})") from None
    if not isinstance(payload, dict) or not {"model", "model_config", "stage"} <= payload.keys():
        raise InputError(f"{path}: not a LiverTumorDARN training checkpoint (no model, model_config and stage)")
    return payload


def _export_within_limit(model: torch.nn.Module, target: Path, limit: int, overwrite: bool) -> None:
    """Script the model to ``target`` atomically, refused over ``limit`` bytes, read back before the rename."""
    import torch

    from .io import atomic_write
    from .models import export_torchscript

    def write(temp: Path) -> None:
        export_torchscript(model, temp)
        size = temp.stat().st_size
        if size > limit:
            raise InputError(f"{target.name}: exported model is {size / 2**20:.1f} MiB, over the "
                             f"{limit / 2**20:.0f} MiB limit for bundled weights; train narrower widths")

    def problem(written: Path) -> None:
        torch.jit.load(str(written))  # raises on a file cut short, which atomic_write reports

    atomic_write(target, ".pt", overwrite, write, problem)


def _manifest_or_new(models_dir: Path) -> dict:
    if not (models_dir / MANIFEST_NAME).exists():
        return {"format": MANIFEST_FORMAT, "intended_use": INTENDED_USE, "models": {}}
    return load_manifest(models_dir)
