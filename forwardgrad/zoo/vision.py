"""torchvision-style ConvNeXt and Vision Transformer in plain ``torch.nn``, scaled down."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad.zoo.convnets import image_batch, stochastic_depth
from forwardgrad.zoo.losses import classification_loss
from forwardgrad.zoo.registry import ZooCase, pick, register

NUM_CLASSES = 10

# --- ConvNeXt --------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """Layer norm over the channels of an NCHW tensor (torchvision's ConvNeXt)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, layer_scale=1e-6, sd=0.0):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.sd = sd

    def forward(self, x):
        result = stochastic_depth(self.layer_scale * self.block(x), self.sd, self.training)
        result += x
        return result


class ConvNeXt(nn.Module):
    def __init__(self, dims, depths, stochastic_depth_prob=0.1, layer_scale=1e-6):
        super().__init__()
        norm = partial(LayerNorm2d, eps=1e-6)
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), norm(dims[0]))]
        total, done = sum(depths), 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i > 0:
                layers.append(nn.Sequential(norm(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)))
            blocks = []
            for _ in range(depth):
                sd = stochastic_depth_prob * done / max(1, total - 1)
                blocks.append(ConvNeXtBlock(dim, layer_scale, sd))
                done += 1
            layers.append(nn.Sequential(*blocks))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            norm(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], NUM_CLASSES)
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def build_convnext(size):
    dims, depths, batch, resolution = pick(
        size, ([8, 16, 32, 64], [1, 1, 1, 1], 2, 32), ([24, 48, 96, 192], [2, 2, 6, 2], 16, 64)
    )
    # Layer scale 0.1 instead of torchvision's 1e-6: at 1e-6 the blocks' gradients are ~1e-6 of
    # the head's and the exactness check would hardly see them.
    return ConvNeXt(dims, depths, layer_scale=0.1), image_batch(batch, resolution)


# --- Vision Transformer ----------------------------------------------------------------------


class EncoderBlock(nn.Module):
    def __init__(self, heads, hidden, mlp, dropout=0.1, attention_dropout=0.1):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(
            hidden, heads, dropout=attention_dropout, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image, patch, layers, heads, hidden, mlp, dropout=0.1):
        super().__init__()
        self.hidden = hidden
        self.conv_proj = nn.Conv2d(3, hidden, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
        seq_length = (image // patch) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            *[EncoderBlock(heads, hidden, mlp, dropout) for _ in range(layers)]
        )
        self.ln = nn.LayerNorm(hidden, eps=1e-6)
        self.heads = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.ln(self.layers(self.dropout(x + self.pos_embedding)))
        return self.heads(x[:, 0])


def build_vit(size):
    layers, hidden, batch = pick(size, (1, 32, 2), (4, 128, 8))
    model = VisionTransformer(32, 4, layers, heads=4, hidden=hidden, mlp=4 * hidden)
    return model, image_batch(batch, 32)


register(
    ZooCase(
        "convnext",
        "vision",
        build_convnext,
        classification_loss,
        description="ConvNeXt-T layout (depthwise 7x7, LayerNorm, GELU, layer scale)",
    )
)
register(
    ZooCase(
        "vit",
        "vision",
        build_vit,
        classification_loss,
        description="torchvision ViT layout (class token, nn.MultiheadAttention)",
    )
)
