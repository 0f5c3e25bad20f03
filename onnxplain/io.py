"""Inputs for the explainer: images with their preprocessing, and .npy/.npz arrays.

Images are resized and cropped the way the model was trained (torchvision's
Resize + CenterCrop geometry), so attributions line up with what the model saw;
the same resized, cropped picture is kept as a uint8 display image to overlay
heatmaps on. Arrays are loaded with ``allow_pickle=False`` always: an input file
must never be able to run code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from onnxplain.errors import InputError, ModelError, OptionError

METADATA_KEY = "onnxplain.preprocess"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")
LAYOUTS = ("nchw", "nhwc")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = {
    "imagenet": dict(size=(224, 224), resize=256, mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
    # Inception/ViT-style: [-1, 1] range, no resize margin.
    "inception": dict(size=(299, 299), resize=299, mean=(0.5,) * 3, std=(0.5,) * 3),
    # Caffe/VGG-style: BGR, 0-255 range, mean pixel subtracted (given in BGR order).
    "caffe": dict(size=(224, 224), resize=256, scale=1.0, bgr=True,
                  mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0)),
    "none": dict(),
}


_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a picture becomes a model input: geometry, then ``(x * scale - mean) / std``.

    ``mean`` and ``std`` are in the model's channel order (BGR when ``bgr``).
    ``resize`` is the shorter side before a centre crop to ``size``; without it the
    picture is resized directly to ``size``; without either it keeps its own size.
    """

    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1.0 / 255.0
    layout: str = "nchw"
    bgr: bool = False
    grayscale: bool = False
    interpolation: str = "bilinear"

    def __post_init__(self):
        size = self.size
        if isinstance(size, (int, np.integer)):
            size = (size, size)
        if size is not None:
            if len(size) != 2 or not all(_positive_int(s) for s in size):
                raise OptionError(f"preprocess size must be two positive integers H,W, got {self.size!r}")
            size = (int(size[0]), int(size[1]))
        if self.resize is not None:
            if not _positive_int(self.resize):
                raise OptionError(f"preprocess resize must be a positive integer, got {self.resize!r}")
            if size is not None and self.resize < min(size):
                raise OptionError(f"preprocess resize {self.resize} is smaller than the crop {size}; "
                                  "set resize >= the crop size")
        mean, std = _floats(self.mean, "mean"), _floats(self.std, "std")
        if mean is not None and std is None:
            std = (1.0,) * len(mean)
        if std is not None and mean is None:
            mean = (0.0,) * len(std)
        if mean is not None and len(mean) != len(std):
            raise OptionError(f"preprocess mean has {len(mean)} values but std has {len(std)}; give one per channel")
        if std is not None and any(s == 0 for s in std):
            raise OptionError("preprocess std contains 0; every channel needs a non-zero std")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise OptionError(f"preprocess scale must be a positive number, got {self.scale!r}")
        layout = str(self.layout).lower()
        if layout not in LAYOUTS:
            raise OptionError(f"preprocess layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.interpolation not in _FILTERS:
            raise OptionError(f"preprocess interpolation must be one of {', '.join(_FILTERS)}, "
                              f"got {self.interpolation!r}")
        if self.bgr and self.grayscale:
            raise OptionError("preprocess cannot be both bgr and grayscale; choose one channel order")
        for name, value in (("size", size), ("mean", mean), ("std", std), ("layout", layout),
                            ("scale", float(self.scale))):
            object.__setattr__(self, name, value)

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    @classmethod
    def preset(cls, name: str) -> "Preprocess":
        if name not in PRESETS:
            raise OptionError(f"unknown preprocess preset '{name}'; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_metadata(cls, meta: dict | str) -> "Preprocess":
        """Read the JSON stored under ``onnxplain.preprocess`` in a model's metadata."""
        where = f"model metadata '{METADATA_KEY}'"
        if isinstance(meta, (str, bytes)):
            try:
                meta = json.loads(meta)
            except ValueError as exc:
                raise ModelError(f"{where} is not valid JSON ({exc}); fix or remove it") from None
        if not isinstance(meta, dict):
            raise ModelError(f"{where} must be a JSON object, got {type(meta).__name__}; fix or remove it")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in meta.items() if k in fields}
        channels = str(meta.get("channels", "")).lower()
        if channels:
            if channels not in ("rgb", "bgr", "gray", "grey"):
                raise ModelError(f"{where}: channels must be rgb, bgr or gray, got {meta['channels']!r}")
            kwargs["bgr"], kwargs["grayscale"] = channels == "bgr", channels in ("gray", "grey")
        crop = meta.get("crop", "center")
        if crop in (None, "none"):
            kwargs.pop("resize", None)
        elif crop not in ("center", "centre"):
            raise ModelError(f"{where}: crop must be 'center' or 'none', got {crop!r}")
        try:
            return cls(**kwargs)
        except (OptionError, TypeError) as exc:
            raise ModelError(f"{where}: {exc}") from None

    @classmethod
    def infer(cls, input_shape) -> "Preprocess":
        """Guess layout, size and channels from a model input shape; scale to [0, 1] only."""
        layout, channels, size = _read_shape(input_shape)
        return cls(size=size, layout=layout or "nchw", grayscale=channels == 1)

    def for_input(self, input_shape) -> "Preprocess":
        """This preprocessing made to fit a model input: the model's layout, channels and size win."""
        layout, channels, size = _read_shape(input_shape)
        changes = {}
        if layout is not None:
            changes["layout"] = layout
        if channels is not None:
            changes["grayscale"] = channels == 1
            changes["bgr"] = self.bgr and channels == 3
        if size is not None:
            if self.size is None:
                changes["size"] = size
            elif self.size != size:
                raise InputError(f"preprocessing makes {self.size[0]}x{self.size[1]} images but the model "
                                 f"input is {tuple(input_shape)}; use a preprocess with size {size[0]},{size[1]}")
        fitted = dataclasses.replace(self, **changes)
        if fitted.mean is not None and len(fitted.mean) not in (1, fitted.channels):
            raise InputError(f"preprocess mean/std have {len(fitted.mean)} values but the model takes "
                             f"{fitted.channels} channel(s); give one value per channel")
        return fitted


def _positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _floats(values, name):
    if values is None:
        return None
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise OptionError(f"preprocess {name} must be numbers, one per channel, got {values!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise OptionError(f"preprocess {name} must be finite numbers, one per channel, got {values!r}")
    return out


def _read_shape(input_shape):
    """(layout, channels, (H, W)) of a rank-4 image input; None where the shape does not say."""
    shape = tuple(input_shape)
    if len(shape) != 4:
        raise InputError(f"model input shape {shape} is not an image batch (N,C,H,W) or (N,H,W,C); "
                         "pass the input as a .npy/.npz array of that shape")
    dims = [int(d) if _positive_int(d) else None for d in shape]
    if dims[1] in (1, 3):
        layout, channels, hw = "nchw", dims[1], dims[2:]
    elif dims[3] in (1, 3):
        layout, channels, hw = "nhwc", dims[3], dims[1:3]
    elif dims[1] is None:
        layout, channels, hw = None, None, dims[2:]
    elif dims[3] is None:
        layout, channels, hw = "nhwc", None, dims[1:3]
    else:
        raise InputError(f"model input shape {shape} has no 1- or 3-channel axis, so images cannot "
                         "be fed to it; pass a .npy/.npz array of that shape")
    size = tuple(hw) if None not in hw else None
    return layout, channels, size


def load_image(path) -> Image.Image:
    """An image file as an RGB picture, upright (EXIF orientation applied), first frame only."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}; check the path")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path} ({exc}); pass a valid "
                         f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} file") from None


def _geometry(img: Image.Image, pre: Preprocess) -> Image.Image:
    if pre.resize is not None:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(pre.resize * long / short)  # truncation, as torchvision's Resize
        img = img.resize((pre.resize, new_long) if w <= h else (new_long, pre.resize), _FILTERS[pre.interpolation])
        if pre.size is not None:
            ch, cw = pre.size
            w, h = img.size
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            img = img.crop((left, top, left + cw, top + ch))
    elif pre.size is not None:
        img = img.resize((pre.size[1], pre.size[0]), _FILTERS[pre.interpolation])
    return img


def prepare_images(paths, pre: Preprocess) -> tuple[np.ndarray, list[np.ndarray]]:
    """(float32 batch in the model's layout, uint8 HxWx3 display images at model resolution)."""
    samples, display = [], []
    for path in paths:
        img = _geometry(load_image(path), pre)
        display.append(np.asarray(img, dtype=np.uint8))
        pixels = img.convert("L") if pre.grayscale else img
        x = np.asarray(pixels, dtype=np.float32).reshape(img.size[1], img.size[0], -1)
        if pre.bgr:
            x = x[..., ::-1]
        x = x * np.float32(pre.scale)
        if pre.mean is not None:
            if len(pre.mean) not in (1, x.shape[-1]):
                raise InputError(f"preprocess mean/std have {len(pre.mean)} values but images have "
                                 f"{x.shape[-1]} channel(s); give one value per channel")
            x = (x - np.float32(pre.mean)) / np.float32(pre.std)
        samples.append(x.transpose(2, 0, 1) if pre.layout == "nchw" else x)
    if not samples:
        raise InputError("no images given; pass at least one image file")
    if len({s.shape for s in samples}) > 1:
        raise InputError("images have different sizes and cannot form one batch; "
                         "give the preprocessing a size (e.g. --preset imagenet or --size H,W)")
    return np.ascontiguousarray(np.stack(samples), dtype=np.float32), display


def load_array(path, key=None, check: bool = True):
    """A .npy array, or a .npz file's single array / dict of named arrays (``key`` picks one).
    Never a pickle. With ``check`` false the values are not checked (NaN, dtype): a dataset
    shard checks them row by row, so that one bad row is that row's error only."""
    path = Path(path)
    if path.suffix.lower() not in ARRAY_SUFFIXES:
        raise InputError(f"{path} is not a .npy or .npz file; save the input with numpy.save or numpy.savez")
    if not path.is_file():
        raise InputError(f"array file not found: {path}; check the path")
    try:
        # np.load trusts the file's magic bytes, not its suffix, so both kinds are handled here.
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):
            if key is not None:
                raise InputError(f"{path} holds one unnamed array; a key applies only to .npz files")
            return _checked(loaded, path) if check else loaded
        with loaded as npz:
            names = list(npz.files)
            if key is not None:
                if key not in names:
                    raise InputError(f"{path} has no array '{key}'; it holds: {', '.join(names) or 'nothing'}")
                names = [key]
            arrays = {name: _checked(npz[name], path, name) if check else npz[name] for name in names}
    except ValueError as exc:
        # numpy names allow_pickle both for object arrays and for pickles renamed .npy/.npz.
        if "pickle" in str(exc):
            raise InputError(f"{path} contains pickled Python objects, which onnxplain never loads; "
                             "save plain numeric arrays") from None
        raise InputError(f"cannot read {path} ({exc}); save it with numpy.save or numpy.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile, MemoryError) as exc:
        raise InputError(f"cannot read {path} ({type(exc).__name__}: {exc}); "
                         "save it with numpy.save or numpy.savez") from None
    if not arrays:
        raise InputError(f"{path} holds no arrays; save at least one with numpy.savez")
    return next(iter(arrays.values())) if len(arrays) == 1 else arrays


def _checked(arr: np.ndarray, path, name=None) -> np.ndarray:
    where = f"{path}" + (f" ['{name}']" if name else "")
    if not isinstance(arr, np.ndarray):  # an npz member that is not .npy comes back as raw bytes
        raise InputError(f"{where} is not a numpy array; save inputs with numpy.save or numpy.savez")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{where} has dtype {arr.dtype}; inputs must be numeric (bool, int or float)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{where} contains NaN or Inf; replace them with finite values")
    return arr


def save_array(path, arr) -> Path:
    """Write an array as .npy, or an array or dict of named arrays as compressed .npz."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise OptionError(f"cannot save an array as '{path.suffix or path.name}'; use a .npy or .npz path")
    arrays = {k: np.asarray(v) for k, v in arr.items()} if isinstance(arr, dict) else {None: np.asarray(arr)}
    for name, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise InputError(f"array {name or ''} has dtype {a.dtype}; only numeric arrays are saved")
    if suffix == ".npy" and isinstance(arr, dict):
        raise OptionError(f"{path}: a dict of arrays needs a .npz path, not .npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npy":
            np.save(path, arrays[None], allow_pickle=False)
        elif isinstance(arr, dict):
            np.savez_compressed(path, **arrays)
        else:
            np.savez_compressed(path, arrays[None])
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc}); check that the directory is writable") from None
    return path


@dataclasses.dataclass
class Inputs:
    """A batch ready for the explainer.

    ``batch``: one array, or a dict input name -> array for multi-input models.
    ``images``: uint8 HxWx3 display images when the inputs were pictures, else None.
    ``names``: one per sample, the file stem (suffixed ``_i`` when a file holds several samples).
    """

    batch: np.ndarray | dict
    images: list[np.ndarray] | None
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


def load_inputs(paths, pre: Preprocess | None = None, model_input_shape=None) -> Inputs:
    """Load image files or array files (never both) as one batch."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise InputError("no input files given; pass at least one image or .npy/.npz file")
    kinds = set()
    for p in paths:
        s = p.suffix.lower()
        if s in IMAGE_SUFFIXES:
            kinds.add("image")
        elif s in ARRAY_SUFFIXES:
            kinds.add("array")
        else:
            raise InputError(f"{p}: unknown input type '{p.suffix}'; use an image "
                             f"({', '.join(IMAGE_SUFFIXES)}) or a .npy/.npz array")
    if len(kinds) > 1:
        raise InputError("inputs mix images and arrays; pass only images or only .npy/.npz files")
    if kinds == {"image"}:
        if pre is None:
            pre = Preprocess.infer(model_input_shape) if model_input_shape is not None else Preprocess()
        elif model_input_shape is not None:
            pre = pre.for_input(model_input_shape)
        batch, images = prepare_images(paths, pre)
        return Inputs(batch, images, [p.stem for p in paths])
    return _stack_arrays(paths, model_input_shape)


def _stack_arrays(paths, model_input_shape) -> Inputs:
    rank = len(model_input_shape) if model_input_shape is not None else None
    loaded = [load_array(p) for p in paths]
    if len({isinstance(a, dict) for a in loaded}) > 1:
        raise InputError("some array files hold one array and others several named ones; "
                         "give every file the same input names")
    parts, counts = [], []
    for path, item in zip(paths, loaded):
        named = item if isinstance(item, dict) else {None: item}
        # A file holding one sample (rank one less than the model's) gets its batch axis here.
        named = {k: (v[None] if rank is not None and v.ndim == rank - 1 else v) for k, v in named.items()}
        sizes = {v.shape[0] if v.ndim else None for v in named.values()}
        if len(sizes) != 1 or None in sizes:
            raise InputError(f"{path}: arrays need a common leading batch dimension, got shapes "
                             f"{[v.shape for v in named.values()]}")
        parts.append(named)
        counts.append(sizes.pop())
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        raise InputError("array files hold different input names; give every file the same names")
    try:
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    except ValueError:
        raise InputError("array files have shapes that do not stack into one batch: "
                         f"{[{k: v.shape for k, v in p.items()} for p in parts]}") from None
    names = [p.stem if n == 1 else f"{p.stem}_{i}" for p, n in zip(paths, counts) for i in range(n)]
    return Inputs(batch[None] if None in batch else batch, None, names)
