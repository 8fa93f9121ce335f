"""SK-ResNeXt: a ResNeXt whose grouped 3x3 convolutions are Selective Kernel units.

Li et al., "Selective Kernel Networks" (CVPR 2019). The module tree and parameter
names match timm's ``skresnext50_32x4d`` so that its published checkpoint
(``skresnext50_ra-f40e40bf.pth``) loads with ``strict=True``.

This file imports torch and :mod:`skray.core.specs` (the registered variants) only: with it,
the part of skray a user can take alone.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from skray.core.specs import DEFAULT_MODEL, ModelSpec, model_spec

__all__ = ["SKResNeXt", "create_model", "prepare_for_inference", "fold_batchnorm"]


def make_divisible(value: float, divisor: int, round_limit: float = 0.9) -> int:
    """Round ``value`` to a multiple of ``divisor``, never dropping more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


class ConvBnAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional ReLU, with 'same' padding for odd kernels."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SelectiveKernelAttn(nn.Module):
    """Per-channel softmax weights over the paths, from the pooled sum of the paths."""

    def __init__(self, channels: int, attn_channels: int, num_paths: int = 2) -> None:
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(attn_channels)
        self.act = nn.ReLU(inplace=True)
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, 1, bias=False)

    def forward(self, paths_sum: torch.Tensor) -> torch.Tensor:
        x = paths_sum.mean((2, 3), keepdim=True)
        x = self.fc_select(self.act(self.bn(self.fc_reduce(x))))
        b, c, h, w = x.shape
        return torch.softmax(x.view(b, self.num_paths, c // self.num_paths, h, w), dim=1)


class SelectiveKernel(nn.Module):
    """Two grouped 3x3 paths (dilation 1 and 2, i.e. a 3x3 and an effective 5x5)
    on the same input, mixed by a learned per-channel softmax attention."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        groups: int = 1,
        rd_ratio: float = 1 / 16,
        rd_divisor: int = 32,
        dilations: tuple[int, ...] = (1, 2),
    ) -> None:
        super().__init__()
        self.paths = nn.ModuleList(
            ConvBnAct(in_chs, out_chs, 3, stride, d, groups) for d in dilations
        )
        self.attn = SelectiveKernelAttn(
            out_chs, make_divisible(out_chs * rd_ratio, rd_divisor), len(dilations)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.stack([path(x) for path in self.paths], dim=1)
        return (paths * self.attn(paths.sum(1))).sum(1)


class SelectiveKernelBottleneck(nn.Module):
    """ResNeXt bottleneck (1x1 -> SK 3x3 grouped -> 1x1, x4 expansion) with a residual."""

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int = 1,
        cardinality: int = 1,
        base_width: int = 64,
        rd_divisor: int = 32,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        out_chs = planes * self.expansion
        self.conv1 = ConvBnAct(in_chs, width, 1)
        self.conv2 = SelectiveKernel(width, width, stride, cardinality, rd_divisor=rd_divisor)
        self.conv3 = ConvBnAct(width, out_chs, 1, act=False)
        self.act = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.conv3(self.conv2(self.conv1(x))) + shortcut)


class SKResNeXt(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) -> 4 stages of SK bottlenecks -> pool -> fc."""

    def __init__(self, spec: ModelSpec, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        self.spec = spec
        self.conv1 = nn.Conv2d(in_chans, spec.stem_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_chs = spec.stem_width
        for index, (depth, planes) in enumerate(zip(spec.layers, spec.planes)):
            stage, in_chs = self._make_stage(spec, in_chs, planes, depth, 1 if index == 0 else 2)
            self.add_module(f"layer{index + 1}", stage)
        self.num_features = in_chs
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(
        spec: ModelSpec, in_chs: int, planes: int, depth: int, stride: int
    ) -> tuple[nn.Sequential, int]:
        out_chs = planes * SelectiveKernelBottleneck.expansion
        blocks = []
        for i in range(depth):
            downsample = None
            if i == 0 and (stride != 1 or in_chs != out_chs):
                downsample = nn.Sequential(
                    nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs)
                )
            blocks.append(
                SelectiveKernelBottleneck(
                    in_chs,
                    planes,
                    stride if i == 0 else 1,
                    spec.cardinality,
                    spec.base_width,
                    spec.rd_divisor,
                    downsample,
                )
            )
            in_chs = out_chs
        return nn.Sequential(*blocks), in_chs

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one of ``num_classes`` outputs."""
        self.fc = nn.Linear(self.num_features, num_classes).to(self.fc.weight.device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map, before pooling: (N, num_features, H/32, W/32)."""
        if x.shape[-1] < 32 or x.shape[-2] < 32:
            raise ValueError(f"input must be at least 32x32 px, got {tuple(x.shape[-2:])}")
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.global_pool(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- factory ----------------------------------------------------------------


def create_model(
    name: str = DEFAULT_MODEL, num_classes: int = 1000, in_chans: int = 3
) -> SKResNeXt:
    """Build a registered variant with random weights (``skray.weights.resolver`` loads them)."""
    return SKResNeXt(model_spec(name), num_classes=num_classes, in_chans=in_chans)


# --- inference fast path ----------------------------------------------------


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv whose output equals ``bn(conv(x))`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter((conv.weight * scale.view(-1, 1, 1, 1)).detach())
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter(((bias - bn.running_mean) * scale + bn.bias).detach())
    return fused


class FusedSelectiveKernel(nn.Module):
    """Inference form of :class:`SelectiveKernel` with two paths.

    A softmax over two logits is ``sigmoid(a0 - a1)``, so the mix becomes
    ``p1 + (p0 - p1) * sigmoid(a0 - a1)``, and the difference folds into a single
    ``fc_select`` of half the outputs: no stack, no 5-D softmax.
    """

    def __init__(self, sk: SelectiveKernel) -> None:
        super().__init__()
        attn = sk.attn
        self.paths = sk.paths
        self.fc_reduce = _fold_conv_bn(attn.fc_reduce, attn.bn)
        c = attn.fc_select.out_channels // 2
        weight = attn.fc_select.weight
        self.fc_select_diff = nn.Conv2d(weight.shape[1], c, 1, bias=False)
        self.fc_select_diff.weight = nn.Parameter((weight[:c] - weight[c:]).detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p0, p1 = self.paths[0](x), self.paths[1](x)
        pooled = (p0 + p1).mean((2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc_select_diff(F.relu(self.fc_reduce(pooled))))
        return torch.addcmul(p1, p0 - p1, gate)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it, in place."""
    for module in list(model.modules()):
        if isinstance(module, ConvBnAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = _fold_conv_bn(module.conv, module.bn)
            module.bn = nn.Identity()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SelectiveKernel) and len(child.paths) == 2:
                setattr(parent, name, FusedSelectiveKernel(child))
            elif (
                isinstance(child, nn.Sequential)
                and len(child) == 2
                and isinstance(child[0], nn.Conv2d)
                and isinstance(child[1], nn.BatchNorm2d)
            ):
                setattr(parent, name, _fold_conv_bn(child[0], child[1]))
    if isinstance(model, SKResNeXt) and isinstance(model.bn1, nn.BatchNorm2d):
        model.conv1 = _fold_conv_bn(model.conv1, model.bn1)
        model.bn1 = nn.Identity()
    return model


def prepare_for_inference(
    model: nn.Module,
    device: str | torch.device = "cpu",
    compile: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn a trained model into its serving form: a callable from NCHW float
    batches to fp32 logits.

    eval mode, BatchNorm folded into convolutions, the SK mix fused, channels_last,
    optionally ``torch.compile``; ``amp_dtype`` (bf16, or fp16 on CUDA) runs it under
    autocast, on the CPU as on a GPU. The result is a copy: the input model is left trainable.
    """
    device = torch.device(device)
    fast = fold_batchnorm(copy.deepcopy(model).eval()).to(device, memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    runner: Callable[[torch.Tensor], torch.Tensor] = fast
    if compile:
        runner = torch.compile(fast, dynamic=False)
    use_amp = amp_dtype is not None

    @torch.inference_mode()
    def predict(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            return runner(x).float()

    predict.module = fast  # type: ignore[attr-defined]
    return predict
