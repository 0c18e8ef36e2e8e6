"""The paper's two-view augmentation (the BYOL asymmetric recipe of the official ``main_moco.py``).

Three pieces:
- ``TwoViewBatchAugment``: whole batches as tensors (CPU or GPU). Random resized crop and flip are one
  ``affine_grid``/``grid_sample`` call (in-memory datasets); ``photometric`` is the rest of the recipe, batched with
  per-sample random factors: colour jitter, grayscale, a per-sample separable Gaussian blur, solarize, normalise.
- ``two_view_pil_crops``: per-image RandomResizedCrop + flip to uint8, for ImageFolder data (paper scale): the
  DataLoader workers do only that (and JPEG decoding), the photometric part runs batched on the GPU: per image, PIL
  colour jitter, blur and solarize cost several times the crops, and starved a GPU (docs/code-measurements.md).
- ``two_view_pil_transforms``: the official per-image torchvision pipeline, kept as the plain reference's loader.

RGB: ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 with the four ops in a random order per image (as torchvision),
RandomGrayscale p=0.2; each op equals torchvision's tensor functional with the same factor (tests). The flip is
done with the crop, before the colour ops instead of after: they are per-pixel or isotropic, so it commutes.
Adaptation for small grayscale images (documented in the README): colour jitter keeps brightness and contrast
(0.4, 0.4) with p=0.8 (saturation and hue do not exist on one channel, and grayscale conversion is a no-op);
blur sigma scales with the image (the profile's ``blur_sigma``); the crop's min scale is the profile's.
View 1: blur p=1.0. View 2: blur p=0.1, solarize p=0.2. Both: crop, flip p=0.5, jitter p=0.8.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from PIL import ImageFilter, ImageOps
from torchvision import transforms as T

CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params: 10 candidates, then the whole image (a square one)


class TwoViewBatchAugment:
    def __init__(self, image_size: int, crop_min: float, blur_sigma: tuple[float, float],
                 mean: tuple[float, ...], std: tuple[float, ...], compile: bool = False):
        self.size, self.crop_min, self.blur_sigma = image_size, crop_min, blur_sigma
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        # the RGB jitter is 16 elementwise passes with 4 per-image reductions: compiled, they fuse into a few kernels
        self._jitter = torch.compile(apply_color_jitter, dynamic=False) if compile else apply_color_jitter

    def crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """RandomResizedCrop(scale=(crop_min, 1), ratio=(3/4, 4/3)) + horizontal flip, as one affine resample.

        The crop's size is drawn as torchvision's ``get_params`` draws it: up to ``CROP_TRIES`` (area, aspect)
        candidates, the first that fits inside the image wins, the whole image if none does. All candidates are drawn
        at once (a fixed number of draws per batch, so a resumed run replays them); sides in continuous units where
        torchvision rounds to pixels."""
        n, dev = x.shape[0], x.device
        u = torch.rand(n, CROP_TRIES, 2, generator=g, device=dev)
        area = self.crop_min + (1 - self.crop_min) * u[..., 0]
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[..., 1]
        ratio = log_r.exp()
        w, h = (area * ratio).sqrt(), (area / ratio).sqrt()
        fits = (w <= 1) & (h <= 1)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first candidate that fits (0 if none)
        none_fit = ~fits.any(dim=1)
        w = torch.where(none_fit, 1.0, w.gather(1, first).squeeze(1))
        h = torch.where(none_fit, 1.0, h.gather(1, first).squeeze(1))
        c = torch.rand(n, 2, generator=g, device=dev)
        cx = (c[:, 0] * 2 - 1) * (1 - w)  # centre, in [-1, 1] units, keeping the crop inside the image
        cy = (c[:, 1] * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=g, device=dev) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [n, x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    @staticmethod
    def jitter(x: torch.Tensor, g: torch.Generator, p: float = 0.8, strength: float = 0.4) -> torch.Tensor:
        """One channel: brightness, then contrast around the mean."""
        n, dev = x.shape[0], x.device
        apply = (torch.rand(n, 1, 1, 1, generator=g, device=dev) < p).float()
        b = 1 + strength * (torch.rand(n, 1, 1, 1, generator=g, device=dev) * 2 - 1)
        c = 1 + strength * (torch.rand(n, 1, 1, 1, generator=g, device=dev) * 2 - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        y = ((x * b - mean * b) * c + mean * b).clamp(0, 1)  # brightness, then contrast around the mean
        return apply * y + (1 - apply) * x

    def jitter_rgb(self, x: torch.Tensor, g: torch.Generator, p: float = 0.8,
                   strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)) -> torch.Tensor:
        """ColorJitter(brightness, contrast, saturation, hue) with probability p, the four ops in a random order per
        image (as torchvision draws a new order per call)."""
        n, dev = x.shape[0], x.device
        u = torch.rand(n, 4, generator=g, device=dev) * 2 - 1
        factors = torch.cat([1 + u[:, :3] * torch.tensor(strength[:3], device=dev), strength[3] * u[:, 3:]], dim=1)
        order = torch.rand(n, 4, generator=g, device=dev).argsort(dim=1)  # a uniform random permutation per image
        apply = torch.rand(n, generator=g, device=dev) < p
        return self._jitter(x, factors, order, apply)

    @staticmethod
    def grayscale(x: torch.Tensor, g: torch.Generator, p: float = 0.2) -> torch.Tensor:
        apply = torch.rand(x.shape[0], 1, 1, 1, generator=g, device=x.device) < p
        return torch.where(apply, rgb_to_gray(x).expand_as(x), x)

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

    def photometric(self, x: torch.Tensor, g: torch.Generator, view: int) -> torch.Tensor:
        """Everything after crop and flip, for view 1 or 2; x in [0, 1], returns the normalised view."""
        x = self.grayscale(self.jitter_rgb(x, g), g) if x.shape[1] == 3 else self.jitter(x, g)
        x = self.blur(x, g, p=1.0) if view == 1 else self.solarize(self.blur(x, g, p=0.1), g, p=0.2)
        return self.normalize(x)

    def from_crops(self, c1: torch.Tensor, c2: torch.Tensor, g: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views from the workers' uint8 crops (``two_view_pil_crops``): to ``device``, to [0, 1], photometric."""
        x1, x2 = (c.to(device, non_blocking=True).float().div_(255) for c in (c1, c2))
        return self.photometric(x1, g, view=1), self.photometric(x2, g, view=2)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        v1 = self.photometric(self.crop_flip(x, g), g, view=1)
        v2 = self.photometric(self.crop_flip(x, g), g, view=2)
        return v1, v2


# ------------------------------------------ torchvision's tensor colour ops, with a factor per image (n, 1, 1, 1)
def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # torchvision's coefficients


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1.0 - factor) * other).clamp(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_gray(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` (a fraction of a turn): RGB -> HSV as torchvision, then HSV -> RGB in closed form
    (channel = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6 with n = 5, 3, 1 for R, G, B), which equals
    torchvision's six-sector table without building it."""
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hue = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
           + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    hue = torch.remainder(hue / 6.0 + shift.view(-1, 1, 1), 1.0)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6.0 * hue.unsqueeze(1), 6.0)
    return maxc.unsqueeze(1) - (maxc * s).unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0, 1)


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def apply_color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor):
    """The jitter's arithmetic, given its random draws: ``factors`` (n, 4), ``order`` (n, 4) a permutation of the
    ops per image, ``apply`` (n,). Each of the 4 slots runs every op, kept per image by a mask (no host sync)."""
    n = x.shape[0]
    for slot in range(4):
        for op, fn in enumerate(COLOR_OPS):
            chosen = (apply & (order[:, slot] == op)).view(n, 1, 1, 1)
            x = torch.where(chosen, fn(x, factors[:, op].view(n, 1, 1, 1)), x)
    return x


class TwoPilCrops:
    """Per image: two independent RandomResizedCrop + horizontal flip, as uint8 tensors (the photometric part of
    the recipe then runs batched, ``TwoViewBatchAugment.photometric``). A class, not a closure, so that DataLoader
    workers started by spawn or forkserver can unpickle it."""

    def __init__(self, image_size: int, crop_min: float):
        self.crop = T.Compose([T.RandomResizedCrop(image_size, scale=(crop_min, 1.0)), T.RandomHorizontalFlip(),
                               T.PILToTensor()])

    def __call__(self, img):
        return self.crop(img), self.crop(img)


def two_view_pil_crops(image_size: int, crop_min: float) -> TwoPilCrops:
    return TwoPilCrops(image_size, crop_min)


def two_view_pil_transforms(image_size: int, crop_min: float):
    """The official ``main_moco.py`` augmentation (BYOL asymmetric), per PIL image, for ImageFolder data."""
    class GaussianBlur:
        def __init__(self, sigma=(0.1, 2.0)):
            self.sigma = sigma

        def __call__(self, img):
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
    return T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
