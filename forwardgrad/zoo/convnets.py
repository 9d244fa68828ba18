"""torchvision-style convolutional networks in plain ``torch.nn``.

The blocks follow torchvision's code as users run it, in-place operations included (``out +=
identity``, ``ReLU(inplace=True)``, in-place ``Dropout`` in the classifiers), since those are
part of what a derivative engine meets. Widths and depths are scaled down to CPU sizes.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from forwardgrad.zoo.losses import classification_loss
from forwardgrad.zoo.registry import ZooCase, pick, register

NUM_CLASSES = 10


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: a multiple of ``divisor`` within 10% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvNormActivation(nn.Sequential):
    """Convolution, batch norm and an optional activation (torchvision's Conv2dNormActivation)."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, activation=nn.ReLU, eps=1e-5):
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=eps),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


def init_weights(model: nn.Module) -> nn.Module:
    """torchvision's initialisation: He for convolutions, unit norms, small linear weights."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 1 / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    return model


def image_batch(batch: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 3, resolution, resolution), torch.randint(0, NUM_CLASSES, (batch,))


# --- ResNet ----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block, layers, width=64):
        super().__init__()
        self.cin = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = [
            self._stage(block, width * 2**i, n, 1 if i == 0 else 2) for i, n in enumerate(layers)
        ]
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.cin, NUM_CLASSES)
        init_weights(self)

    def _stage(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.cin != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.cin, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage = [block(self.cin, planes, stride, downsample)]
        self.cin = planes * block.expansion
        stage += [block(self.cin, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layers(x)), 1))


def build_resnet18(size):
    width, batch, resolution = pick(size, (8, 2, 32), (16, 16, 64))
    return ResNet(BasicBlock, [2, 2, 2, 2], width), image_batch(batch, resolution)


def build_resnet50(size):
    layers, width, batch, resolution = pick(
        size, ([1, 1, 1, 1], 4, 2, 32), ([3, 4, 6, 3], 16, 8, 64)
    )
    return ResNet(Bottleneck, layers, width), image_batch(batch, resolution)


# --- MobileNetV2 -----------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(cin, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


MOBILENET_V2_SETTINGS = [  # expansion t, channels c, repeats n, stride s
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class MobileNetV2(nn.Module):
    def __init__(self, width_mult=1.0, settings=MOBILENET_V2_SETTINGS, last_channel=1280):
        super().__init__()
        cin = make_divisible(32 * width_mult)
        last = make_divisible(last_channel * max(1.0, width_mult))
        features = [ConvNormActivation(3, cin, 3, 2, activation=nn.ReLU6)]
        for t, c, n, s in settings:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvNormActivation(cin, last, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, NUM_CLASSES))
        init_weights(self)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def build_mobilenet_v2(size):
    # small: 64 px, so that the last stages still batch-normalise over 2 x 2 x 2 values, not 2
    width, last, batch, resolution = pick(size, (0.25, 128, 2, 64), (0.5, 640, 8, 64))
    settings = pick(
        size, [s[:2] + [1] + s[3:] for s in MOBILENET_V2_SETTINGS], MOBILENET_V2_SETTINGS
    )
    return MobileNetV2(width, settings, last), image_batch(batch, resolution)


# --- MobileNetV3 and EfficientNet ------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """torchvision's row-mode stochastic depth: drop whole samples of a residual branch."""
    if not training or p == 0.0:
        return x
    noise = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device)
    return x * noise.bernoulli_(1 - p).div_(1 - p)


class MobileBlock(nn.Module):
    """MobileNetV3's and EfficientNet's inverted residual with squeeze-and-excitation."""

    def __init__(self, cin, kernel, expanded, cout, se, activation, stride, sd=0.0, eps=1e-3):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        self.sd = sd
        layers = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, activation=activation, eps=eps))
        layers.append(
            ConvNormActivation(expanded, expanded, kernel, stride, expanded, activation, eps)
        )
        if se == "hard":  # MobileNetV3
            layers.append(
                SqueezeExcitation(expanded, make_divisible(expanded // 4), nn.ReLU, nn.Hardsigmoid)
            )
        elif se == "silu":  # EfficientNet
            layers.append(
                SqueezeExcitation(expanded, max(1, cin // 4), partial(nn.SiLU, inplace=True))
            )
        layers.append(ConvNormActivation(expanded, cout, 1, activation=None, eps=eps))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result = stochastic_depth(result, self.sd, self.training)
            result += x
        return result


MOBILENET_V3_SMALL = [  # input, kernel, expanded, output, SE, activation, stride
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
]


class MobileNetV3(nn.Module):
    def __init__(self, settings=MOBILENET_V3_SMALL, last_channel=1024):
        super().__init__()
        layers = [ConvNormActivation(3, settings[0][0], 3, 2, activation=nn.Hardswish, eps=1e-3)]
        for cin, k, exp, cout, se, act, stride in settings:
            activation = nn.Hardswish if act == "HS" else nn.ReLU
            layers.append(
                MobileBlock(cin, k, exp, cout, "hard" if se else None, activation, stride)
            )
        lastconv = 6 * settings[-1][3]
        layers.append(
            ConvNormActivation(settings[-1][3], lastconv, 1, activation=nn.Hardswish, eps=1e-3)
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(0.2, inplace=True),
            nn.Linear(last_channel, NUM_CLASSES),
        )
        init_weights(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_mobilenet_v3(size):
    settings = pick(size, MOBILENET_V3_SMALL[:5], MOBILENET_V3_SMALL)
    last, batch, resolution = pick(size, (128, 2, 32), (1024, 8, 96))
    return MobileNetV3(settings, last), image_batch(batch, resolution)


EFFICIENTNET_B0 = [  # expansion, kernel, stride, input, output, layers
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


class EfficientNet(nn.Module):
    def __init__(self, settings=EFFICIENTNET_B0, width_mult=1.0, stochastic_depth_prob=0.2):
        super().__init__()
        width = [
            (t, k, s, make_divisible(i * width_mult), make_divisible(o * width_mult), n)
            for t, k, s, i, o, n in settings
        ]
        silu = nn.SiLU
        layers = [ConvNormActivation(3, width[0][3], 3, 2, activation=silu)]
        total, done = sum(n for *_, n in width), 0
        for t, k, s, cin, cout, n in width:
            for i in range(n):
                sd = stochastic_depth_prob * done / total
                expanded = make_divisible(cin * t)
                layers.append(
                    MobileBlock(cin, k, expanded, cout, "silu", silu, s if i == 0 else 1, sd, 1e-5)
                )
                cin, done = cout, done + 1
        last = 4 * cin
        layers.append(ConvNormActivation(cin, last, 1, activation=silu))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(last, NUM_CLASSES))
        init_weights(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_efficientnet(size):
    settings = pick(size, [s[:5] + (1,) for s in EFFICIENTNET_B0[:4]], EFFICIENTNET_B0)
    width, batch, resolution = pick(size, (0.25, 2, 32), (0.5, 8, 64))
    return EfficientNet(settings, width), image_batch(batch, resolution)


for _name, _build, _description in [
    ("resnet18", build_resnet18, "torchvision ResNet-18 layout (BasicBlock), narrow"),
    ("resnet50", build_resnet50, "torchvision ResNet-50 layout (Bottleneck), narrow"),
    ("mobilenet-v2", build_mobilenet_v2, "torchvision MobileNetV2 (ReLU6, depthwise)"),
    ("mobilenet-v3", build_mobilenet_v3, "MobileNetV3-Small (hardswish, hardsigmoid SE)"),
    ("efficientnet", build_efficientnet, "EfficientNet-B0 layout (SiLU, SE, stochastic depth)"),
]:
    register(
        ZooCase(
            _name,
            "vision",
            _build,
            classification_loss,
            description=_description,
            float32_limited=_name == "mobilenet-v3",  # hardsigmoid (see ZooCase)
        )
    )
