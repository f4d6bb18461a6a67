"""Two models from outside the paper, as their users build them, for `contsup.wrap` and
`--arch contsup.backbones:<factory>` (each factory takes `num_classes`, as `--arch
package.module:factory` calls it). They are plain torchvision models: nothing here knows
about ContSup.

- `cifar_resnet18`: torchvision's ResNet-18 with the stem CIFAR users train it with, a
  3x3 stride-1 first convolution and no max-pool (the ImageNet stem, a 7x7 stride-2
  convolution and a stride-2 max-pool, leaves a 32x32 image 8x8 before the first block).
- `small_vit`: torchvision's VisionTransformer sized for 32x32 images: 4x4 patches (an 8x8
  grid, 64 patch tokens and a class token), 6 layers of width 128, 4 heads.
"""
from __future__ import annotations

import torch.nn as nn


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's resnet18(num_classes) with a 3x3 stride-1 conv1 and no max-pool."""
    import torchvision
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits it
    model.maxpool = nn.Identity()
    return model


def small_vit(num_classes: int = 10) -> nn.Module:
    """torchvision's VisionTransformer for 32x32 images: patch 4, 6 layers, width 128, 4 heads, MLP 256."""
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=4, hidden_dim=128, mlp_dim=256,
                             num_classes=num_classes)
