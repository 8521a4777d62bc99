"""DARN, the Deep Attentive Refinement Network for liver and liver-tumor segmentation of 3D CT.

Paper: Yao Zhang, Jiang Tian, Cheng Zhong, Yang Zhang, Zhongchao Shi, Zhiqiang He,
"DARN: Deep Attentive Refinement Network for Liver Tumor Segmentation from 3D CT Volume"
(Institute of Computing Technology CAS / UCAS / Lenovo Research; LiTS 2017, 75.9 % Dice per case
with the Spa + Sem order).

The paper fixes the outline: a Pyramid Feature Encoder (PFE) extracts multi-level features; a
Semantic Attentive Refinement module (SemRef, top-down) and a Spatial Attentive Refinement module
(SpaRef, bottom-up) enhance each level under the guidance of its neighbouring higher or lower
level; the refined levels are aggregated into the segmentation. Spa then Sem ordering scored best.

Everything else the paper leaves open. Our choices, each with its reason:

- Channel widths: encoder (8, 16, 32, 64, 128) over five levels and a pyramid width of 16. The
  model must run on a 2-core CPU inside 3D Slicer and ship as a small file, so widths are a
  quarter of nnU-Net's; five levels let the top level see a stage's 64^3 patch at 1/16 resolution
  (4^3): at 4 mm that is the whole liver, at 1.5 mm a large part of it.
- Common pyramid width (FPN-style 1x1x1 lateral projections): SemRef and SpaRef add a neighbour
  level to the current one, which needs equal channel counts.
- Normalisation: InstanceNorm3d (affine). 3D patches force batch sizes of 1-2, where BatchNorm
  statistics are noise; InstanceNorm also behaves identically in training and inference, so the
  eager and scripted models agree exactly (as in nnU-Net).
- Activation: LeakyReLU(0.01), nnU-Net's default; ReLU inside the channel-attention MLP as in
  squeeze-and-excitation.
- Residual blocks: conv-norm-act, conv-norm, plus identity (or 1x1x1 conv when widths differ),
  then act; one block per level. Residual connections keep a 15-conv-deep encoder easy to train
  from scratch on 131 cases.
- Downsampling in the encoder: strided 3x3x3 conv (learned, no pooling layer to tune).
- SemRef attention form: squeeze-excitation channel attention whose input is the global average
  pool of both the current level F_i and the upsampled guidance G (2C -> C/r -> C, sigmoid), so
  the semantic level decides which channels of the finer level to keep.
  Output = conv3x3x3(F_i * attention + G).
- SpaRef attention form: CBAM-style spatial attention, one sigmoid channel from a 3x3x3 conv on
  the channel-mean and channel-max of F_i and of the downsampled guidance D, so the finer level
  decides where (boundaries) the coarser level should look. Output = conv3x3x3(F_i * attention + D).
- Upsampling: trilinear interpolation (parameter-free, smooth; transposed convs add
  checkerboard artefacts and weights).
- Downsampling inside SpaRef: 2x2x2 average pooling rather than a strided conv. Neighbouring
  levels differ by exactly 2 (input sizes are checked), the pooling is parameter-free and
  anti-aliased, and the fusion conv right after it already learns the mixing, so a strided
  conv would only add weights and cost at the finer resolution.
- Aggregation at full resolution: every refined level is upsampled to level 1, concatenated
  (L * pyramid_width channels), reduced by a 1x1x1 conv, then one 3x3x3 conv block and a 1x1x1
  classifier. Predicting at full resolution keeps tumour boundaries sharp, the paper's stated
  motivation for the low-level features. The 1x1x1 conv of the concatenation is computed as
  the sum of per-level 1x1x1 projections, each applied at its own resolution before upsampling:
  both operations are linear and trilinear weights sum to one, so this is exactly the same
  function (a test checks it) without materialising an L * pyramid_width channel full-resolution
  tensor (5x less memory and FLOPs for that layer).
- Deep supervision: optional (off by default) 1x1x1 heads on every refined coarser level, used
  only by the training loop through ``forward_with_auxiliary``; ``forward`` always returns the
  main logits alone so the exported TorchScript has one output.
- Loss: Dice + cross-entropy as in nnU-Net; it lives in the training module, not here.

The default model (in_channels=1, num_classes=3, widths (8, 16, 32, 64, 128), pyramid width 16,
spa_sem, no deep supervision) has 1,543,135 parameters (a 6.0 MiB float32 TorchScript file); its
measured cost is in docs/results.md. See ``forward`` for the divisibility requirement.

Inference loads only the TorchScript file written by ``export_torchscript``; ``build_model``
rebuilds the same architecture from the constructor arguments stored in the weights manifest.

The second network here, :class:`BoundaryRefinementNet`, refines one tumor at a time from an
image patch and its coarse-mask patch (see its docstring and ``refine.py``).
"""

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SCALE_BETWEEN_LEVELS = 2
"""Each pyramid level has half the resolution of the one below it along every axis."""

SPATIAL_DESCRIPTORS = 4
"""Channels that SpaRef's attention conv sees: mean and max over channels, of F_i and of D."""

ORDERS = ("spa_sem", "sem_spa")


class ConvNormAct(nn.Sequential):
    """Conv3d (no bias, the norm has one) -> InstanceNorm3d -> LeakyReLU; 'same' padding."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
        negative_slope: float = 0.01,
    ):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(negative_slope, inplace=True),
        )


class ResidualBlock(nn.Module):
    """Two 3x3x3 conv-norm layers plus a shortcut (identity, or 1x1x1 conv-norm when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.01):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, negative_slope=negative_slope)
        self.conv2 = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels, affine=True),
        )
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, bias=False),
                nn.InstanceNorm3d(out_channels, affine=True),
            )
        self.act = nn.LeakyReLU(negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class PyramidFeatureEncoder(nn.Module):
    """PFE: one residual stage per level, each projected by a 1x1x1 conv to ``pyramid_width``.

    Level 1 is a stem conv at input resolution; level i > 1 starts with a stride-2 conv.
    Input [B, in_channels, D, H, W] -> list of L tensors, level i: [B, pyramid_width, D/2^(i-1), ...].
    """

    def __init__(
        self, in_channels: int, widths: Sequence[int], pyramid_width: int, negative_slope: float,
    ):
        super().__init__()
        stages = []
        previous = in_channels
        for level, width in enumerate(widths):
            stride = 1 if level == 0 else SCALE_BETWEEN_LEVELS
            stages.append(nn.Sequential(
                ConvNormAct(previous, width, stride=stride, negative_slope=negative_slope),
                ResidualBlock(width, width, negative_slope),
            ))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.laterals = nn.ModuleList([nn.Conv3d(width, pyramid_width, 1) for width in widths])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features: List[torch.Tensor] = []
        for stage, lateral in zip(self.stages, self.laterals):
            x = stage(x)
            features.append(lateral(x))
        return features


class ChannelAttention(nn.Module):
    """Squeeze-excitation over the global average pools of a level and its guidance.

    f, g: [B, C, D, H, W] -> weights [B, C, 1, 1, 1] in (0, 1).
    """

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv3d(2 * channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([f.mean(dim=(2, 3, 4), keepdim=True), g.mean(dim=(2, 3, 4), keepdim=True)], dim=1)
        return self.mlp(pooled)  # [B, 2C, 1, 1, 1] -> [B, C, 1, 1, 1]


class SpatialAttention(nn.Module):
    """CBAM-style map from channel-mean and channel-max of a level and its guidance.

    f, d: [B, C, D, H, W] -> weights [B, 1, D, H, W] in (0, 1).
    """

    def __init__(self, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv3d(SPATIAL_DESCRIPTORS, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, f: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        descriptors = torch.cat([
            f.mean(dim=1, keepdim=True), f.amax(dim=1, keepdim=True),
            d.mean(dim=1, keepdim=True), d.amax(dim=1, keepdim=True),
        ], dim=1)  # [B, 4, D, H, W]
        return torch.sigmoid(self.conv(descriptors))


class SemRef(nn.Module):
    """Semantic attentive refinement of one level by the refined level above it (coarser).

    f: [B, C, D, H, W], coarser: [B, C, D/2, H/2, W/2] -> [B, C, D, H, W].
    """

    def __init__(self, channels: int, reduction: int, negative_slope: float):
        super().__init__()
        self.attention = ChannelAttention(channels, reduction)
        self.fuse = ConvNormAct(channels, channels, negative_slope=negative_slope)

    def forward(self, f: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        g = F.interpolate(coarser, size=f.shape[2:], mode="trilinear", align_corners=False)
        return self.fuse(f * self.attention(f, g) + g)


class SpaRef(nn.Module):
    """Spatial attentive refinement of one level by the refined level below it (finer).

    f: [B, C, D, H, W], finer: [B, C, 2D, 2H, 2W] -> [B, C, D, H, W].
    """

    def __init__(self, channels: int, attention_kernel_size: int, negative_slope: float):
        super().__init__()
        self.down = nn.AvgPool3d(SCALE_BETWEEN_LEVELS)
        self.attention = SpatialAttention(attention_kernel_size)
        self.fuse = ConvNormAct(channels, channels, negative_slope=negative_slope)

    def forward(self, f: torch.Tensor, finer: torch.Tensor) -> torch.Tensor:
        d = self.down(finer)
        return self.fuse(f * self.attention(f, d) + d)


class SemanticRefinement(nn.Module):
    """SemRef over the pyramid, top-down: the top level passes through, each lower level is
    refined by the already refined level above it. List of L tensors -> list of L tensors."""

    def __init__(self, num_levels: int, channels: int, reduction: int, negative_slope: float):
        super().__init__()
        # blocks[j] refines level L-2-j (0-based), so iterating the list walks top-down.
        self.blocks = nn.ModuleList(
            [SemRef(channels, reduction, negative_slope) for _ in range(num_levels - 1)]
        )

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        top = len(features) - 1
        top_down: List[torch.Tensor] = [features[top]]
        for j, block in enumerate(self.blocks):
            top_down.append(block(features[top - 1 - j], top_down[j]))
        top_down.reverse()
        return top_down


class SpatialRefinement(nn.Module):
    """SpaRef over the pyramid, bottom-up: the bottom level passes through, each higher level is
    refined by the already refined level below it. List of L tensors -> list of L tensors."""

    def __init__(
        self, num_levels: int, channels: int, attention_kernel_size: int, negative_slope: float,
    ):
        super().__init__()
        # blocks[j] refines level j+1 (0-based), so iterating the list walks bottom-up.
        self.blocks = nn.ModuleList(
            [SpaRef(channels, attention_kernel_size, negative_slope) for _ in range(num_levels - 1)]
        )

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        bottom_up: List[torch.Tensor] = [features[0]]
        for j, block in enumerate(self.blocks):
            bottom_up.append(block(features[j + 1], bottom_up[j]))
        return bottom_up


class Aggregation(nn.Module):
    """Full-resolution head: 1x1x1 conv of all levels concatenated -> 3x3x3 block -> 1x1x1 logits.

    The 1x1x1 conv of the concatenation [L*C channels] is computed as a sum of per-level 1x1x1
    convs applied before upsampling (identical function, see module docstring); only the
    finest level's projection carries the bias. List of L tensors [B, C, D/2^i, ...] -> logits [B, num_classes, D, H, W].
    """

    def __init__(self, num_levels: int, channels: int, num_classes: int, negative_slope: float):
        super().__init__()
        self.project_finest = nn.Conv3d(channels, channels, 1)
        self.project_coarser = nn.ModuleList(
            [nn.Conv3d(channels, channels, 1, bias=False) for _ in range(num_levels - 1)]
        )
        self.block = ConvNormAct(channels, channels, negative_slope=negative_slope)
        self.classifier = nn.Conv3d(channels, num_classes, 1)

    def forward(self, levels: List[torch.Tensor]) -> torch.Tensor:
        size = levels[0].shape[2:]
        fused = self.project_finest(levels[0])
        for j, projection in enumerate(self.project_coarser):
            fused = fused + F.interpolate(projection(levels[j + 1]), size=size, mode="trilinear", align_corners=False)
        return self.classifier(self.block(fused))


class DARN(nn.Module):
    """Deep Attentive Refinement Network (Zhang et al.): PFE -> SpaRef/SemRef -> full-res aggregation.

    Args:
        in_channels: input channels (1 for a CT window).
        num_classes: output logits (background, liver, tumour).
        encoder_widths: channels of PFE levels 1..L; the number of levels L is its length (>= 2).
        pyramid_width: common channel count of all pyramid levels after the lateral projections.
        order: "spa_sem" (SpaRef bottom-up, then SemRef top-down; the paper's best) or "sem_spa".
        deep_supervision: add 1x1x1 heads on refined levels 2..L, returned by
            ``forward_with_auxiliary`` in training mode.
        reduction: squeeze-excitation reduction ratio of SemRef's channel attention.
        attention_kernel_size: kernel of SpaRef's spatial-attention conv.
        negative_slope: LeakyReLU slope.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        encoder_widths: Sequence[int] = (8, 16, 32, 64, 128),
        pyramid_width: int = 16,
        order: str = "spa_sem",
        deep_supervision: bool = False,
        reduction: int = 4,
        attention_kernel_size: int = 3,
        negative_slope: float = 0.01,
    ):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        num_levels = len(encoder_widths)
        if num_levels < 2:
            raise ValueError(f"DARN needs at least 2 encoder levels, got encoder_widths={tuple(encoder_widths)}")
        self.spatial_first: bool = order == "spa_sem"
        self.deep_supervision: bool = deep_supervision
        self.size_multiple: int = SCALE_BETWEEN_LEVELS ** (num_levels - 1)
        # Built in the same order whatever ``order`` is, so one seed gives the same weights.
        self.encoder = PyramidFeatureEncoder(in_channels, encoder_widths, pyramid_width, negative_slope)
        self.spatial_refinement = SpatialRefinement(num_levels, pyramid_width, attention_kernel_size, negative_slope)
        self.semantic_refinement = SemanticRefinement(num_levels, pyramid_width, reduction, negative_slope)
        self.aggregation = Aggregation(num_levels, pyramid_width, num_classes, negative_slope)
        self.auxiliary_heads = nn.ModuleList(
            [nn.Conv3d(pyramid_width, num_classes, 1) for _ in range(num_levels - 1)] if deep_supervision else []
        )

    def _refined_levels(self, x: torch.Tensor) -> List[torch.Tensor]:
        d, h, w = x.shape[2], x.shape[3], x.shape[4]
        if d % self.size_multiple != 0 or h % self.size_multiple != 0 or w % self.size_multiple != 0:
            raise ValueError(
                "DARN needs D, H, W divisible by {}, got {}x{}x{}; pad the input".format(self.size_multiple, d, h, w)
            )
        levels = self.encoder(x)
        if self.spatial_first:
            return self.semantic_refinement(self.spatial_refinement(levels))
        return self.spatial_refinement(self.semantic_refinement(levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, D, H, W] with D, H, W divisible by 2**(L-1) -> logits [B, num_classes, D, H, W]."""
        return self.aggregation(self._refined_levels(x))

    @torch.jit.export
    def forward_with_auxiliary(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Main logits first, then (deep supervision, training mode only) logits of refined levels
        2..L at their own resolution [B, num_classes, D/2^(i-1), ...]; otherwise just [main]."""
        levels = self._refined_levels(x)
        outputs: List[torch.Tensor] = [self.aggregation(levels)]
        if self.deep_supervision and self.training:
            for j, head in enumerate(self.auxiliary_heads):
                outputs.append(head(levels[j + 1]))
        return outputs


class FeatureExtractionPath(nn.Module):
    """The skip path of the refinement network: ``depth`` residual blocks instead of a bare copy.

    A plain U-Net skip hands raw encoder features to the decoder; on a small patch there is little
    context, so the paper passes them through extra feature-extraction blocks first. Shallow levels
    are further from the decoder's semantics, so they get more blocks (as MultiResUNet's ResPath).
    """

    def __init__(self, channels: int, depth: int, negative_slope: float):
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualBlock(channels, channels, negative_slope) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DecoderLevel(nn.Module):
    """Upsample the coarser decoder output, join it with this level's skip path, one residual block."""

    def __init__(self, channels: int, coarser_channels: int, skip_depth: int, negative_slope: float):
        super().__init__()
        self.skip = FeatureExtractionPath(channels, skip_depth, negative_slope)
        self.block = ResidualBlock(channels + coarser_channels, channels, negative_slope)

    def forward(self, encoded: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        skip = self.skip(encoded)
        coarser = F.interpolate(coarser, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.block(torch.cat([skip, coarser], dim=1))


INITIAL_MASK_PRIOR = 3.0


class BoundaryRefinementNet(nn.Module):
    """Refines one coarse tumor: [image, coarse mask] patch in, logits [background, tumor] out.

    The method (Zhang et al., boundary optimisation of liver tumor segmentations) feeds the coarse
    mask as a second input channel so the network attends to the boundary it must move; the output
    can shrink or expand the coarse mask. The paper fixes only that outline; our choices:

    - A 3D encoder-decoder over ``widths`` levels (default 12, 24, 48, 96: the 32^3 patch of
      ``patches.PATCH_SIZE`` reaches 4^3 at the bottom, enough to see the whole tumor and its
      rim). The widths keep one click under a second on a 2-core CPU and the file under 8 MiB.
      Residual blocks, InstanceNorm and LeakyReLU as in DARN, for the same reasons.
    - Skip connections through :class:`FeatureExtractionPath` with ``levels - 1 - i`` blocks at
      level i (3, 2, 1 for four levels): the paper's feature-extraction blocks.
    - Decoder: trilinear upsampling, concatenation with the skip path, one residual block.
    - Two output classes and DARN's Dice + cross-entropy loss, so the training code is shared.
    - ``in_channels`` 4 adds the positive and negative clicks' maps after the image and the mask
      (``patches.click_maps``), as interactive segmentation networks take them; the paper has no
      clicks. The mask stays channel 1, so the mask prior below is the same for both.
    - The coarse mask is also added to the output logits, +/- ``mask_prior`` (a learned weight,
      3 at the start: 95% for the coarse answer). An untrained network thus returns the coarse
      mask and training learns only the corrections, so a mask that is already good stays good
      from the first step and the capacity goes to the boundary. Without it our CPU-trained
      network first had to relearn the mask it was given and made good masks worse.
    """

    def __init__(self, widths: Sequence[int] = (12, 24, 48, 96), negative_slope: float = 0.01, in_channels: int = 2):
        super().__init__()
        levels = len(widths)
        if levels < 2:
            raise ValueError(f"the refinement network needs at least 2 levels, got widths={tuple(widths)}")
        if in_channels < 2:
            raise ValueError(f"the refinement network takes the image and the coarse mask at least, got in_channels={in_channels}")
        self.size_multiple: int = SCALE_BETWEEN_LEVELS ** (levels - 1)
        self.in_channels: int = in_channels
        self.encoder = nn.ModuleList([
            nn.Sequential(ConvNormAct(in_channels if i == 0 else widths[i - 1], width,
                                      stride=1 if i == 0 else SCALE_BETWEEN_LEVELS, negative_slope=negative_slope),
                          ResidualBlock(width, width, negative_slope))
            for i, width in enumerate(widths)])
        # coarsest first, the order in which forward uses them
        self.decoder = nn.ModuleList([DecoderLevel(widths[i], widths[i + 1], levels - 1 - i, negative_slope)
                                      for i in range(levels - 2, -1, -1)])
        self.classifier = nn.Conv3d(widths[0], 2, 1)
        self.mask_prior = nn.Parameter(torch.tensor(INITIAL_MASK_PRIOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, D, H, W] (image, coarse mask(, positive and negative clicks)), sizes divisible
        by 2**(levels-1) -> logits [B, 2, D, H, W]."""
        half_prior = self.mask_prior * (x[:, 1:2] - 0.5)
        features: List[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        for j, level in enumerate(self.decoder):
            x = level(features[len(features) - 2 - j], x)
        return self.classifier(x) + torch.cat([-half_prior, half_prior], 1)


ARCHITECTURES = {"darn": DARN, "refine": BoundaryRefinementNet}


def build_model(config: Dict) -> nn.Module:
    """A network from its constructor arguments as stored in the weights manifest; the key
    ``architecture`` ("darn", the default, or "refine") picks the class."""
    config = dict(config)
    return ARCHITECTURES[config.pop("architecture", "darn")](**config)


def export_torchscript(model: nn.Module, path) -> None:
    """Script the model in eval mode and save it; inference loads only this TorchScript file."""
    model.eval()
    torch.jit.save(torch.jit.script(model), str(path))
