"""Extra views per image: the distortions subnet validators apply to challenge images, in PIL/numpy.

Levels follow the validators' recipe: 0 = centre square crop only; 1 = rotation (<= 20 deg),
random square crop (area 0.2-1.0), horizontal / vertical flips; 2 = level 1 + mild colour
saturation, contrast and JPEG-like downsampling (each on or off at random); 3 = level 1 + those
plus colour noise and Gaussian blur at up to the second intensity. Every random draw comes from
one seed, so a view is a pure function of (image, seed, level).

Two recipes are registered in ``VIEW_RECIPES`` (``extract --view-recipe``): ``validator-v1`` (the
approximation above, ``make_view``; what stores made before 0.2 record) and ``validator`` (the
default for new stores, ``validator_view``): a faithful reimplementation of the subnet's
``natix/utils/image_transforms.py: apply_augmentation_by_level`` followed by the JPEG quality-75
transport encoding of ``natix/protocol.py: prepare_image_synapse``. ``validator-flips`` is the same
with the horizontal / vertical flips firing (p = 0.5 each), for when the subnet fixes them.
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from stage1._core.registry import Registry

from stage1._core.constants import DEFAULT_VIEW_LEVELS  # noqa: F401 (re-exported)
from stage1._core.constants import VIEW_LEVELS as LEVELS

#: Recipe name of stores made before recipes could be chosen (read when a record names none).
RECIPE = "validator-v1"
#: The subnet-faithful recipe: the default for new stores.
VALIDATOR_RECIPE = "validator"
DEFAULT_RECIPE = VALIDATOR_RECIPE
#: Side of the validator's served image (``natix/validator/config.py: TARGET_IMAGE_SIZE``).
VALIDATOR_SIZE = 224
#: Pillow's default JPEG quality, which ``prepare_image_synapse`` uses.
JPEG_QUALITY = 75


# Intensity tables (mildest first), DeeperForensics-style as the validators use them.
SATURATION = (0.4, 0.3)  # chroma scale: lower = more washed out
CONTRAST = (0.85, 0.725)  # pixel scale: lower = flatter / darker
JPEG_FACTOR = (2, 3)  # downsample factor before upsampling back
NOISE_VAR = (0.001, 0.002)  # variance of colour noise in YCbCr, on a 0-1 scale
BLUR_KERNEL = (7, 9)  # Gaussian kernel size; sigma = kernel / 6


def view_seed(sha256: str, view: int, base_seed: int = 0) -> int:
    """A 63-bit seed for view ``view`` of the image with content hash ``sha256``."""
    digest = hashlib.sha256(f"{base_seed}:{sha256}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def view_level(view: int, levels: Sequence[int] = DEFAULT_VIEW_LEVELS) -> int:
    """The distortion level of extra view ``view`` (1-based), cycling through ``levels``."""
    if view < 1:
        raise ValueError("view 0 is the clean image; extra views start at 1")
    return int(levels[(view - 1) % len(levels)])


def _center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    m = min(w, h)
    left, top = (w - m) // 2, (h - m) // 2
    return img.crop((left, top, left + m, top + m))


def _random_square_crop(img: Image.Image, rng: np.random.Generator, scale: tuple[float, float] = (0.2, 1.0)) -> Image.Image:
    """A square crop covering a uniform(scale) fraction of the area (centre square if none fits)."""
    w, h = img.size
    for _ in range(10):
        side = int(round(math.sqrt(rng.uniform(*scale) * w * h)))
        if 0 < side <= w and side <= h:
            left = int(rng.integers(0, w - side + 1))
            top = int(rng.integers(0, h - side + 1))
            return img.crop((left, top, left + side, top + side))
    return _center_square(img)


def _ycbcr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("YCbCr"), dtype=np.float32)


def _from_ycbcr(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "YCbCr").convert("RGB")


def saturation(img: Image.Image, factor: float) -> Image.Image:
    """Scale chroma (Cb, Cr) around neutral by ``factor`` (0 = greyscale)."""
    arr = _ycbcr(img)
    arr[..., 1:] = 128.0 + (arr[..., 1:] - 128.0) * factor
    return _from_ycbcr(arr)


def contrast(img: Image.Image, factor: float) -> Image.Image:
    """Multiply pixel values by ``factor`` (the validators' contrast reduction)."""
    arr = np.asarray(img, dtype=np.float32) * factor
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def jpeg_like(img: Image.Image, factor: int) -> Image.Image:
    """Downsample by ``factor`` and upsample back (bilinear): the loss of fine detail of heavy JPEG."""
    w, h = img.size
    small = img.resize((max(1, w // factor), max(1, h // factor)), Image.BILINEAR)
    return small.resize((w, h), Image.BILINEAR)


def colour_noise(img: Image.Image, variance: float, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise (std = sqrt(variance) on a 0-1 scale) in YCbCr."""
    arr = _ycbcr(img)
    arr += rng.normal(0.0, math.sqrt(variance) * 255.0, size=arr.shape).astype(np.float32)
    return _from_ycbcr(arr)


def blur(img: Image.Image, kernel: int) -> Image.Image:
    """Gaussian blur with sigma = kernel / 6."""
    return img.filter(ImageFilter.GaussianBlur(radius=kernel / 6.0))


def make_view(img: Image.Image, seed: int, level: int, size: int | None = None) -> Image.Image:
    """A validator-style distorted view of ``img`` (RGB), deterministic in (img, seed, level).

    ``size``: resize the crop to ``size`` x ``size`` before the photometric distortions, as the
    validators do (their blur and downsampling act at the served resolution); None keeps the crop size.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    rng = np.random.default_rng(seed)
    out = img.convert("RGB") if img.mode != "RGB" else img
    if level == 0:
        out = _center_square(out)
    else:
        angle = float(rng.uniform(-20.0, 20.0))
        out = out.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=(0, 0, 0))
        out = _random_square_crop(out, rng)
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_TOP_BOTTOM)
    if size is not None and out.size != (size, size):
        out = out.resize((size, size), Image.BICUBIC)
    if level >= 2:
        top = 1 if level == 2 else 2  # highest intensity index + 1 (0 = off)
        s, c, j = (int(rng.integers(0, top + 1)) for _ in range(3))
        if s:
            out = saturation(out, SATURATION[s - 1])
        if c:
            out = contrast(out, CONTRAST[c - 1])
        if j:
            out = jpeg_like(out, JPEG_FACTOR[j - 1])
        if level == 3:
            n, b = (int(rng.integers(0, top + 1)) for _ in range(2))
            if n:
                out = colour_noise(out, NOISE_VAR[n - 1], rng)
            if b:
                out = blur(out, BLUR_KERNEL[b - 1])
    return out.copy() if out is img else out


# ======================================================================================================
# The subnet-faithful recipe ("validator")
# ======================================================================================================

#: Per-view parameters recorded in a store's ``view_params`` [N, V, P] (NaN = not applicable), in order.
#: crop_* are in pixels of the rotated full image (level 0: the centre square); hflip / vflip 0 or 1;
#: cs, cc, jpeg, noise, blur are the distortion levels drawn (0 = off; NaN at levels 0 and 1).
PARAM_NAMES: tuple[str, ...] = ("angle", "crop_top", "crop_left", "crop_side", "hflip", "vflip",
                                "cs", "cc", "jpeg", "noise", "blur")
#: Distortion order and the highest intensity each level may draw (``get_random_augmentations_*``).
DISTORTIONS_L2: tuple[str, ...] = ("cs", "cc", "jpeg")
DISTORTIONS_L3: tuple[str, ...] = ("cs", "cc", "jpeg", "noise", "blur")


def empty_params() -> np.ndarray:
    """A float32 [len(PARAM_NAMES)] record with every field NaN (not applicable / not recorded)."""
    return np.full(len(PARAM_NAMES), np.nan, dtype=np.float32)


def _to_float(u8: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] exactly as torchvision's ToTensor (x / 255 in float32)."""
    return u8.astype(np.float32) / np.float32(255.0)


def _to_u8(f: np.ndarray) -> np.ndarray:
    """float32 [0, 1] -> uint8 by truncation, as the subnet does (``(x * 255).astype(uint8)``, ToPILImage)."""
    return (np.asarray(f, dtype=np.float32) * np.float32(255.0)).astype(np.uint8)


# -- cv2's float YCrCb conversion (delta 0.5, as cv2 uses for float32 input) and the studio-range map --
def bgr_to_ycbcr(bgr: np.ndarray) -> np.ndarray:
    """The subnet's ``bgr2ycbcr``: cv2 float BGR->YCrCb (delta 0.5) on 0-255 values, reordered to
    Y, Cb, Cr, then Y * 219 / 255 + 16 / 255 and Cb, Cr * 224 / 255 + 16 / 255 ("studio range")."""
    x = bgr.astype(np.float32)
    b, g, r = x[..., 0], x[..., 1], x[..., 2]
    y = np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b
    cr = (r - y) * np.float32(0.713) + np.float32(0.5)
    cb = (b - y) * np.float32(0.564) + np.float32(0.5)
    out = np.stack([y, cb, cr], axis=-1)
    out[..., 0] = (out[..., 0] * (235 - 16) + 16) / np.float32(255.0)
    out[..., 1:] = (out[..., 1:] * (240 - 16) + 16) / np.float32(255.0)
    return out


def ycbcr_to_bgr(ycbcr: np.ndarray) -> np.ndarray:
    """Inverse of ``bgr_to_ycbcr`` (the subnet's ``ycbcr2bgr``): float BGR, not clipped."""
    x = ycbcr.astype(np.float32).copy()
    x[..., 0] = (x[..., 0] * np.float32(255.0) - 16) / (235 - 16)
    x[..., 1:] = (x[..., 1:] * np.float32(255.0) - 16) / (240 - 16)
    y, cb, cr = x[..., 0], x[..., 1] - np.float32(0.5), x[..., 2] - np.float32(0.5)
    r = y + np.float32(1.403) * cr
    g = y - np.float32(0.714) * cr - np.float32(0.344) * cb
    b = y + np.float32(1.773) * cb
    return np.stack([b, g, r], axis=-1)


def _trunc_u8(x: np.ndarray) -> np.ndarray:
    """float -> uint8 by truncation; values outside [0, 255] are clipped first (numpy's cast of them is undefined)."""
    return np.clip(x, 0, 255).astype(np.uint8)


def cs_bgr(bgr: np.ndarray, factor: float) -> np.ndarray:
    """Colour saturation: Cb and Cr (studio-range YCbCr) pulled towards 0.5 by ``factor``; truncated to uint8."""
    ycc = bgr_to_ycbcr(bgr)
    ycc[..., 1:] = np.float32(0.5) + (ycc[..., 1:] - np.float32(0.5)) * np.float32(factor)
    return _trunc_u8(ycbcr_to_bgr(ycc))


def cc_bgr(bgr: np.ndarray, factor: float) -> np.ndarray:
    """Colour contrast: pixel values times ``factor``, truncated to uint8."""
    return (bgr.astype(np.float32) * np.float32(factor)).astype(np.uint8)


def _linear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR sampling along one axis: half-pixel centres, edges clamped, no antialias."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0)


def linear_resize(u8: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bilinear resize of an HxWxC uint8 array to ``w`` x ``h`` as cv2.resize does (no antialias), rounded."""
    y0, y1, fy = _linear_axis(u8.shape[0], h)
    x0, x1, fx = _linear_axis(u8.shape[1], w)
    a = u8.astype(np.float64)
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def downscale_bgr(bgr: np.ndarray, factor: int) -> np.ndarray:
    """The subnet's "JPEG" distortion: resize to (w // factor, h // factor) and back, bilinear."""
    h, w = bgr.shape[:2]
    small = linear_resize(bgr, max(1, w // factor), max(1, h // factor))
    return linear_resize(small, w, h)


def noise_bgr(bgr: np.ndarray, variance: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise in YCbCr: ``ycc / 255 + sqrt(variance) * N(0, 1)``, times 255, back to BGR, clipped."""
    ycc = bgr_to_ycbcr(bgr) / np.float32(255.0)
    noisy = (ycc + math.sqrt(variance) * rng.standard_normal(ycc.shape)) * 255.0
    return _trunc_u8(ycbcr_to_bgr(noisy.astype(np.float32)))


def gaussian_kernel(kernel: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of ``kernel`` taps (odd) and ``sigma``, centred."""
    x = np.arange(kernel, dtype=np.float64) - (kernel - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def blur_bgr(bgr: np.ndarray, kernel: int) -> np.ndarray:
    """Gaussian blur, ``kernel`` x ``kernel`` taps, sigma = kernel / 6, reflect-101 borders, rounded."""
    g = gaussian_kernel(kernel, kernel / 6.0)
    r = kernel // 2
    a = bgr.astype(np.float64)
    pad = np.pad(a, ((r, r), (0, 0), (0, 0)), mode="reflect")
    a = sum(g[k] * pad[k:k + a.shape[0]] for k in range(kernel))
    pad = np.pad(a, ((0, 0), (r, r), (0, 0)), mode="reflect")
    a = sum(g[k] * pad[:, k:k + bgr.shape[1]] for k in range(kernel))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _distortion(name: str, level: int, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """The uint8 BGR -> uint8 BGR function of distortion ``name`` at intensity ``level`` (1-based)."""
    if name == "cs":
        return lambda a: cs_bgr(a, SATURATION[level - 1])
    if name == "cc":
        return lambda a: cc_bgr(a, CONTRAST[level - 1])
    if name == "jpeg":
        return lambda a: downscale_bgr(a, JPEG_FACTOR[level - 1])
    if name == "noise":
        return lambda a: noise_bgr(a, NOISE_VAR[level - 1], rng)
    if name == "blur":
        return lambda a: blur_bgr(a, BLUR_KERNEL[level - 1])
    raise ValueError(f"unknown distortion {name!r}")


def jpeg_roundtrip(img: Image.Image, quality: int = JPEG_QUALITY) -> Image.Image:
    """Encode ``img`` as JPEG with Pillow (``quality``, Pillow's default subsampling) and decode it again."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def centre_crop_box(w: int, h: int) -> tuple[int, int, int]:
    """(top, left, side) of torchvision's CenterCrop(min(w, h)): offsets int(round((dim - side) / 2))."""
    m = min(w, h)
    return int(round((h - m) / 2.0)), int(round((w - m) / 2.0)), m


def random_resized_crop_box(w: int, h: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.2, 1.0)) -> tuple[int, int, int]:
    """(top, left, side) as torchvision's RandomResizedCrop.get_params draws it with ratio (1, 1).

    Ten tries of a square of area uniform(scale) * w * h at a uniform position; the centre square
    of side min(w, h) when none fits.
    """
    area = w * h
    for _ in range(10):
        side = int(round(math.sqrt(area * rng.uniform(*scale))))
        if 0 < side <= w and side <= h:
            top = int(rng.integers(0, h - side + 1))
            left = int(rng.integers(0, w - side + 1))
            return top, left, side
    side = min(w, h)
    return (h - side) // 2, (w - side) // 2, side


def _float_resize(chans: list[Image.Image], box: tuple[int, int, int], size: int) -> list[Image.Image]:
    top, left, side = box
    return [c.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side)) for c in chans]


def _merge_float(chans: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(c, dtype=np.float32) for c in chans], axis=-1)


def validator_clean(img: Image.Image, size: int = VALIDATOR_SIZE, jpeg: bool = True) -> Image.Image:
    """Level 0 of the validator (``get_base_transforms``), then the JPEG transport encoding.

    RGB, torchvision CenterCrop(min(w, h)), Resize(size) (bilinear, antialiased: Pillow's BILINEAR),
    ToTensor / ToPILImage (x / 255 * 255 truncated), JPEG quality 75 encode / decode when ``jpeg``.
    """
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    top, left, side = centre_crop_box(*rgb.size)
    out = rgb.crop((left, top, left + side, top + side))
    if out.size != (size, size):
        out = out.resize((size, size), Image.BILINEAR)
    out = Image.fromarray(_to_u8(_to_float(np.asarray(out, dtype=np.uint8))), "RGB")
    return jpeg_roundtrip(out) if jpeg else out


def validator_view(img: Image.Image, seed: int, level: int, *, flips: bool = False,
                   size: int = VALIDATOR_SIZE, jpeg: bool = True) -> tuple[Image.Image, np.ndarray]:
    """One validator challenge view of ``img`` at ``level`` and its parameter record (``PARAM_NAMES``).

    Deterministic in (img, seed, level). Level 0: ``validator_clean``. Levels 1-3: rotation by
    uniform(-20, 20) degrees (bilinear, black fill, same size, on float pixels), a RandomResizedCrop
    box (scale 0.2-1, ratio 1) resized to ``size`` (bilinear, antialiased), flips only with ``flips``
    (p = 0.5 each; the subnet's never fire); level 2: CS, CC, downscale each at intensity
    uniform{0, 1}; level 3: CS, CC, downscale, noise, blur each at uniform{0, 1, 2}; each active
    distortion on uint8 BGR made by truncation as the subnet does. Then the JPEG q75 round trip.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    params = empty_params()
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    if level == 0:
        top, left, side = centre_crop_box(*rgb.size)
        params[1:4] = (top, left, side)
        return validator_clean(rgb, size, jpeg), params
    rng = np.random.default_rng(seed)
    angle = float(rng.uniform(-20.0, 20.0))
    f = _to_float(np.asarray(rgb, dtype=np.uint8))
    chans = [Image.fromarray(np.ascontiguousarray(f[..., c]), "F").rotate(angle, resample=Image.BILINEAR,
                                                                           expand=False, fillcolor=0.0)
             for c in range(3)]
    box = random_resized_crop_box(*rgb.size, rng)
    f = _merge_float(_float_resize(chans, box, size))
    hflip = bool(rng.random() < 0.5) if flips else False
    vflip = bool(rng.random() < 0.5) if flips else False
    if hflip:
        f = f[:, ::-1]
    if vflip:
        f = f[::-1]
    params[0], params[1:4], params[4:6] = angle, box, (hflip, vflip)
    if level >= 2:
        names = DISTORTIONS_L2 if level == 2 else DISTORTIONS_L3
        top = 1 if level == 2 else 2
        draws = [int(rng.integers(0, top + 1)) for _ in names]
        for name, lv in zip(names, draws):
            params[6 + DISTORTIONS_L3.index(name)] = lv
            if lv:
                bgr = np.ascontiguousarray(_to_u8(f)[..., ::-1])
                f = _to_float(np.ascontiguousarray(_distortion(name, lv, rng)(bgr)[..., ::-1]))
    out = Image.fromarray(_to_u8(np.clip(f, 0.0, 1.0)), "RGB")
    return (jpeg_roundtrip(out) if jpeg else out), params


# ======================================================================================================
# The recipe registry
# ======================================================================================================

@dataclass(frozen=True)
class ViewMaker:
    """A registered view recipe: its default levels and how view ``view`` of an image is made."""

    name: str
    default_levels: tuple[int, ...]
    make: Callable[[Image.Image, int, int, int], tuple[Image.Image, np.ndarray]]
    random_level: bool

    def level(self, seed: int, view: int, levels: Sequence[int]) -> int:
        """The level of extra view ``view``: drawn uniformly from ``levels`` (seeded), or cycled (v1)."""
        if not self.random_level:
            return view_level(view, levels)
        return int(levels[int(np.random.default_rng([seed, 1]).integers(len(levels)))])

    def view(self, img: Image.Image, seed: int, view: int, levels: Sequence[int],
             size: int) -> tuple[Image.Image, int, np.ndarray]:
        """(image, level, parameter record) of extra view ``view`` (>= 1) with seed ``seed``."""
        level = self.level(seed, view, levels)
        out, params = self.make(img, seed, level, size)
        return out, level, params


VIEW_RECIPES: Registry[ViewMaker] = Registry("view recipe")


def _v1(img: Image.Image, seed: int, level: int, size: int) -> tuple[Image.Image, np.ndarray]:
    return make_view(img, seed, level, size=size), empty_params()


def _validator(img: Image.Image, seed: int, level: int, size: int) -> tuple[Image.Image, np.ndarray]:
    return validator_view(img, seed, level)


def _validator_flips(img: Image.Image, seed: int, level: int, size: int) -> tuple[Image.Image, np.ndarray]:
    return validator_view(img, seed, level, flips=True)


VIEW_RECIPES.register(RECIPE)(lambda: ViewMaker(RECIPE, DEFAULT_VIEW_LEVELS, _v1, False))
VIEW_RECIPES.register(VALIDATOR_RECIPE)(lambda: ViewMaker(VALIDATOR_RECIPE, LEVELS, _validator, True))
VIEW_RECIPES.register("validator-flips")(lambda: ViewMaker("validator-flips", LEVELS, _validator_flips, True))


def view_recipe(name: str) -> ViewMaker:
    """The registered recipe ``name`` (UnknownNameError listing the names otherwise)."""
    return VIEW_RECIPES.create(name)
