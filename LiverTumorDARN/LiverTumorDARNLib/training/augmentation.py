"""DARN's augmentation, on the device, per sample (nnU-Net's, Isensee et al. 2021, less mirroring).

Scaling 0.85-1.25 and rotation up to 15 degrees about the cranio-caudal axis (one
``grid_sample``), intensity scale and shift, gamma, gaussian noise. No mirroring on any axis:
nnU-Net mirrors, but the canonical orientation puts the liver on the patient's right (low x),
below the diaphragm and in front of the spine; a mirrored patch shows anatomy that never occurs
and teaches the network to look for liver on the wrong side. Elastic deformation is left out: it
costs more than the network on a CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..pipeline import AIR_VALUE, normalize_hu

NORMALISED_AIR = float(normalize_hu(np.array(AIR_VALUE)))
"""The network-input value of air, used wherever a patch or a volume is padded."""


def augment(images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly scaled/rotated (in the axial plane), intensity-jittered copies of a batch.

    images [B, 1, z, y, x], labels [B, z, y, x]; returns new tensors of the same shapes.
    """
    images, labels = images.clone(), labels.clone()
    for b in range(images.shape[0]):
        if rng.random() < 0.3:
            images[b], labels[b] = _scale_and_rotate(images[b], labels[b], rng.uniform(0.85, 1.25),
                                                     math.radians(rng.uniform(-15, 15)))
        images[b] = _jitter_intensity(images[b], rng)
    return images, labels


def _scale_and_rotate(image: torch.Tensor, labels: torch.Tensor, scale: float, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom by ``scale`` about the patch centre and rotate by ``angle`` about z (a proper rotation:
    left stays left). image [1, z, y, x], labels [z, y, x]."""
    depth, height, width = labels.shape
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # Output -> input voxel offsets (x, y, z order), mapped into grid_sample's [-1, 1] coordinates.
    voxel = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0 / scale]], dtype=torch.float32)
    to_unit = torch.diag(torch.tensor([2.0 / width, 2.0 / height, 2.0 / depth]))
    theta = torch.zeros(1, 3, 4)
    theta[0, :, :3] = to_unit @ voxel @ torch.linalg.inv(to_unit)
    grid = F.affine_grid(theta.to(image.device), [1, 1, depth, height, width], align_corners=False)
    # grid_sample pads with zeros: shift so that zero is air, and background for the labels.
    moved = F.grid_sample((image - NORMALISED_AIR)[None], grid, mode="bilinear", align_corners=False)[0] + NORMALISED_AIR
    moved_labels = F.grid_sample(labels[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0]
    return moved, moved_labels.to(labels.dtype)


def _jitter_intensity(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """nnU-Net's intensity augmentations with its probabilities; sizes relative to the patch's std."""
    spread = float(image.std()) + 1e-6
    if rng.random() < 0.15:
        image = image * rng.uniform(0.75, 1.25)
    if rng.random() < 0.15:
        image = image + rng.uniform(-0.1, 0.1) * spread
    if rng.random() < 0.3:
        low, high = image.min(), image.max()
        unit = (image - low) / (high - low + 1e-6)
        image = unit ** rng.uniform(0.7, 1.5) * (high - low) + low
    if rng.random() < 0.15:
        image = image + torch.randn_like(image) * rng.uniform(0.0, 0.1) * spread
    return image
