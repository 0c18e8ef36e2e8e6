"""The paper's two-view augmentation (the BYOL asymmetric recipe of the official ``main_moco.py``).

Two implementations of one recipe:
- ``TwoViewBatchAugment``: whole batches as tensors (CPU or GPU), for the in-memory datasets. Random resized
  crop and flip are one ``affine_grid``/``grid_sample`` call; blur is a per-sample separable Gaussian.
- ``two_view_pil_transforms``: the official per-image torchvision pipeline, for ImageFolder data (paper scale).

Adaptation for small grayscale images (documented in the README): colour jitter keeps brightness and contrast
(0.4, 0.4) with p=0.8 (saturation and hue do not exist on one channel, and grayscale conversion is a no-op);
blur sigma scales with the image (the profile's ``blur_sigma``); the crop's min scale is the profile's.
View 1: blur p=1.0. View 2: blur p=0.1, solarize p=0.2. Both: crop, flip p=0.5, jitter p=0.8.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class TwoViewBatchAugment:
    def __init__(self, image_size: int, crop_min: float, blur_sigma: tuple[float, float],
                 mean: tuple[float, ...], std: tuple[float, ...]):
        self.size, self.crop_min, self.blur_sigma = image_size, crop_min, blur_sigma
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """RandomResizedCrop(scale=(crop_min, 1), ratio=(3/4, 4/3)) + horizontal flip, as one affine resample."""
        n, dev = x.shape[0], x.device
        u = torch.rand(n, 4, generator=g, device=dev)
        area = self.crop_min + (1 - self.crop_min) * u[:, 0]
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
        ratio = log_r.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (u[:, 2] * 2 - 1) * (1 - w)  # centre, in [-1, 1] units, keeping the crop inside the image
        cy = (u[:, 3] * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=g, device=dev) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [n, x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    @staticmethod
    def jitter(x: torch.Tensor, g: torch.Generator, p: float = 0.8, strength: float = 0.4) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        apply = (torch.rand(n, 1, 1, 1, generator=g, device=dev) < p).float()
        b = 1 + strength * (torch.rand(n, 1, 1, 1, generator=g, device=dev) * 2 - 1)
        c = 1 + strength * (torch.rand(n, 1, 1, 1, generator=g, device=dev) * 2 - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        y = ((x * b - mean * b) * c + mean * b).clamp(0, 1)  # brightness, then contrast around the mean
        return apply * y + (1 - apply) * x

    def blur(self, x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
        n, ch, dev = x.shape[0], x.shape[1], x.device
        lo, hi = self.blur_sigma
        sigma = lo + (hi - lo) * torch.rand(n, generator=g, device=dev)
        radius = max(1, math.ceil(2 * hi))
        t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (n*ch, K): one kernel per image-channel
        y = x.reshape(1, n * ch, *x.shape[2:])
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, k[:, None, None, :], groups=n * ch)
        y = F.conv2d(y, k[:, None, :, None], groups=n * ch).reshape_as(x)
        apply = (torch.rand(n, 1, 1, 1, generator=g, device=dev) < p).float()
        return apply * y + (1 - apply) * x

    @staticmethod
    def solarize(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
        apply = torch.rand(x.shape[0], 1, 1, 1, generator=g, device=x.device) < p
        return torch.where(apply & (x >= 0.5), 1 - x, x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        v1 = self.blur(self.jitter(self.crop_flip(x, g), g), g, p=1.0)
        v2 = self.solarize(self.blur(self.jitter(self.crop_flip(x, g), g), g, p=0.1), g, p=0.2)
        return self.normalize(v1), self.normalize(v2)


def two_view_pil_transforms(image_size: int, crop_min: float):
    """The official ``main_moco.py`` augmentation (BYOL asymmetric), per PIL image, for ImageFolder data."""
    from PIL import ImageFilter, ImageOps
    from torchvision import transforms as T

    class GaussianBlur:
        def __init__(self, sigma=(0.1, 2.0)):
            self.sigma = sigma

        def __call__(self, img):
            import random
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))

    class Solarize:
        def __call__(self, img):
            return ImageOps.solarize(img)

    normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    common = [T.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
              T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    view1 = T.Compose(common + [T.RandomApply([GaussianBlur()], p=1.0), T.RandomHorizontalFlip(),
                                T.ToTensor(), normalize])
    view2 = T.Compose(common + [T.RandomApply([GaussianBlur()], p=0.1), T.RandomApply([Solarize()], p=0.2),
                                T.RandomHorizontalFlip(), T.ToTensor(), normalize])

    def two_crops(img):
        return view1(img), view2(img)

    return two_crops


def eval_pil_transform(image_size: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
