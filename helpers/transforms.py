"""Image transforms for training and evaluation, written without torchvision: the IRRA recipe
(Jiang & Ye, CVPR 2023) of resize, horizontal flip, pad-and-crop, ImageNet normalisation and
random erasing (Zhong et al., AAAI 2020). Images in, (3, H, W) float tensors out.

Used by data.py (`train_transform`, `eval_transform`).  Test: pytest tests/test_data.py -k transform
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the ViT checkpoints were trained with these
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize (bilinear) to (H, W) = size and scale to [0, 1]: (3, H, W) float."""
    H, W = size
    if image.size != (W, H):
        image = image.resize((W, H), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std  # (3, H, W)


@dataclass
class EvalTransform:
    size: tuple

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalize(to_tensor(image, self.size))  # (3, H, W)


@dataclass
class TrainTransform:
    """Resize, horizontal flip, pad-and-crop, normalise, random erasing (IRRA, Jiang & Ye 2023:
    Pad(10) + RandomCrop at 384x128, RandomErasing(scale=(0.02, 0.4), value=mean) after
    normalisation; erasing to 0 here *is* the mean after normalisation). Uses torch's RNG, which
    DataLoader seeds per worker."""
    size: tuple
    flip_p: float = 0.5
    pad: int | None = None  # None: 10 pixels at height 384, scaled to this height
    erase_p: float = 0.5
    erase_scale: tuple = (0.02, 0.4)
    erase_ratio: tuple = (0.3, 3.3)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        H, W = self.size
        x = to_tensor(image, self.size)  # (3, H, W)
        if torch.rand(()) < self.flip_p:
            x = x.flip(-1)
        pad = round(10 * H / 384) if self.pad is None else self.pad
        if pad > 0:
            x = F.pad(x, (pad, pad, pad, pad))  # (3, H + 2 pad, W + 2 pad), black border
            i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[:, i:i + H, j:j + W]  # (3, H, W)
        x = normalize(x)
        if torch.rand(()) < self.erase_p:
            x = self.erase(x)
        return x

    def erase(self, x: torch.Tensor) -> torch.Tensor:
        """Zero a random rectangle of random area and aspect ratio (Zhong et al., AAAI 2020)."""
        _, H, W = x.shape
        log_r = torch.log(torch.tensor(self.erase_ratio))
        for _ in range(10):
            area = H * W * float(torch.empty(()).uniform_(*self.erase_scale))
            ratio = math.exp(float(torch.empty(()).uniform_(float(log_r[0]), float(log_r[1]))))
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < h < H and 0 < w < W:
                i, j = int(torch.randint(0, H - h + 1, ())), int(torch.randint(0, W - w + 1, ()))
                x = x.clone()
                x[:, i:i + h, j:j + w] = 0.0
                return x
        return x
