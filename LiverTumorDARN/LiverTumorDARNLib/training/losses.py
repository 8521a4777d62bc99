"""Losses: cross-entropy plus soft Dice (nnU-Net, Isensee et al. 2021), with deep supervision.

The Dice is a batch Dice: summed over the whole batch, so that a patch without tumor is no 0/0
and small tumors count as much as the batch holds of them. With deep supervision the auxiliary
outputs get weights halving per level (normalised to sum 1) against labels reduced by
max-pooling, which keeps a tumor visible at coarse levels (labels are nested: tumor 2 > liver 1 >
background 0).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Cross-entropy + (1 - batch soft Dice averaged over the foreground classes); 0 when perfect.

    logits [B, C, z, y, x], target [B, z, y, x] class indices. Computed in float32 whatever the
    autocast precision of the logits.
    """
    logits = logits.float()
    probabilities = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probabilities.dtype)
    axes = (0, 2, 3, 4)
    intersection = (probabilities * one_hot).sum(axes)
    total = probabilities.sum(axes) + one_hot.sum(axes)
    dice = (2 * intersection + smooth) / (total + smooth)
    return F.cross_entropy(logits, target) + (1 - dice[1:].mean())


def deep_supervision_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Weighted :func:`dice_ce_loss` over the main and auxiliary outputs (weights 1, 1/2, 1/4 ...
    normalised to sum 1), labels max-pooled to each auxiliary resolution."""
    weights = [0.5 ** level for level in range(len(outputs))]
    total = 0.0
    for weight, output in zip(weights, outputs):
        level_target = target
        if output.shape[2:] != target.shape[1:]:
            level_target = F.adaptive_max_pool3d(target[:, None].float(), output.shape[2:])[:, 0].long()
        total = total + weight * dice_ce_loss(output, level_target)
    return total / sum(weights)
