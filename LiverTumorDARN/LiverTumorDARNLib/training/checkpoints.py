"""Training checkpoints: written atomically, and resumed only by a run of the same network.

A checkpoint (``last.pt``, ``best.pt``) is a dict of tensors and plain values, read back with
``weights_only=True`` (``weights.read_checkpoint``)::

    model, model_config, optimizer, scaler, iteration, config, stage, best_val_dice, val_scores
    replica_checksums   (the final last.pt: one checksum of the weights per DDP process)

``export`` (``weights.export_checkpoint``) turns one into weights that ``segment`` loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..weights import read_checkpoint


def save_checkpoint(payload: dict, path: Path) -> Path:
    """torch.save to a temp file next to ``path``, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.partial-{secrets.token_hex(6)}")
    try:
        with open(temp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    return path


def refuse_to_overwrite(out_dir: Path) -> None:
    """A run without resume must not replace the checkpoints of another run."""
    if (Path(out_dir) / "last.pt").exists():
        raise InputError(f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose another --out")


def resume_checkpoint(path: Path, stage: str, architecture: dict) -> dict:
    """The checkpoint at ``path``, refused unless it was trained for ``stage`` with ``architecture``."""
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint to resume from; train without --resume first")
    checkpoint = read_checkpoint(path)
    trained_for = checkpoint["stage"]["name"]
    if trained_for != stage or plain(checkpoint["model_config"]) != plain(architecture):
        raise InputError(f"{path}: checkpoint was trained for stage {trained_for!r} with model "
                         f"{checkpoint['model_config']}; this run asks for stage {stage!r} with {architecture}")
    return checkpoint


def plain(value):
    """``value`` with tuples as lists, as JSON and manifests hold them, so that architectures compare
    equal however they were stored."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 of the parameters and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
