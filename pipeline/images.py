"""Files people have -> 28x28 uint8 images as the datasets store them (0 background, 255 ink).

A model trained on MNIST or Fashion-MNIST only knows images made the way that dataset was made, so
a photo or scan is normalised by the dataset's own recipe:
- mnist (LeCun et al.): the digit's bounding box is scaled, anti-aliased, to 20 px on its longer
  side and put in a 28x28 field with its centre of mass at pixel (14, 14).
- fashion_mnist (Xiao et al. 2017): the product is trimmed, its longest edge resized to 28 and
  the result centred in 28x28.
Both store ink bright on dark, so a light background is inverted first. Arrays (.npy, .npz) and
IDX files are taken as already in the dataset's form and only checked. Nothing is ever unpickled.

A file may be hostile, so only regular files are read, and sizes are checked before anything is
allocated: MAX_BYTES for the file, an array's declared shape and what a .npz member or gzip stream
decompresses to; MAX_PIXELS for a picture's declared width x height.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import stat
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.io import idx_dims, parse_idx
from pipeline.stage import DataError

DATASETS = ("mnist", "fashion_mnist")
SIDE = 28  # both datasets' images are 28x28
DIGIT_BOX = 20  # MNIST: the digit's longer side, before centring by mass in 28x28
CENTRE = 14.0  # MNIST: every test digit's centre of mass lies within 14 +- 0.5 (row and column)
MIN_SIZE = 8  # px; anything smaller cannot hold a legible digit or product
MIN_CONTRAST = 24  # grey levels from background to the brightest ink; below that: blank
DIGIT_INK = 0.1  # MNIST: share of full ink a pixel needs to count towards the digit's box
PRODUCT_TRIM = 0.05  # Fashion-MNIST: trims what lies within 5% of full intensity of the background
ACCEPTED = "PNG, JPEG, .npy, .npz, IDX images (gzipped or not)"
# The whole MNIST dataset is 55 MB as uint8 and 220 MB as float32: it fits, a decompression bomb
# or a header declaring (10**9, 28, 28) does not.
MAX_BYTES = 256 * 2**20  # a file, an array, or what a .npz or gzip file decompresses to
# A picture costs ~20 bytes a pixel while converted: a 6000x4000 photo (24 MP) ~0.5 GB and ~1 s.
# Pillow itself would only warn from 89 MP on and refuse from 179 MP on.
MAX_PIXELS = 25_000_000

GZIP_MAGIC = b"\x1f\x8b"
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"  # .npz is a zip of .npy files


def read_images(path: Path, dataset: str) -> list[tuple[str, np.ndarray]]:
    """Every image in one file as (label, uint8 [28, 28]); raises DataError naming the file and why.

    The kind of file is told from its content, not its name, so a renamed file still reads.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    data = _read_bytes(path)
    if data.startswith(GZIP_MAGIC):
        return _idx_images(_gunzip(data, path), path)
    if data.startswith(b"\x00\x00"):  # IDX of any type: _idx_images names what it holds
        return _idx_images(data, path)
    if data.startswith(NPY_MAGIC):
        return _npy_images(data, path)
    if data.startswith(ZIP_MAGIC):
        return _npz_images(data, path)
    return [(str(path), picture(data, str(path), dataset, ACCEPTED))]


def _read_bytes(path: Path) -> bytes:
    """A regular file's bytes. Opened without blocking and checked before it is read: a FIFO
    would wait for a writer forever, a device such as /dev/zero never ends."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)  # of what was opened: a link is followed once, with no race
        if stat.S_ISDIR(info.st_mode):
            raise DataError(f"{path}: is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{path}: not a regular file (a pipe, socket or device); not read")
        size = info.st_size
        if size > MAX_BYTES:
            raise DataError(f"{path}: {_size(size)}, larger than the limit of {_size(MAX_BYTES)}")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(size + 1)  # read(n) allocates n bytes at once: not MAX_BYTES
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:  # grown since
        raise DataError(f"{path}: larger than the limit of {_size(MAX_BYTES)}")
    if not data:
        raise DataError(f"{path}: empty file")
    return data


def _size(n: int) -> str:
    if n < 2**20:
        return f"{n:,} bytes"
    return f"{n // 2**20:,} MiB" if n % 2**20 == 0 else f"{n / 2**20:,.1f} MiB"


# ---- arrays: .npy, .npz, IDX --------------------------------------------------------------------


def _gunzip(data: bytes, path: Path) -> bytes:
    """A gzipped IDX file's bytes, decompressed only as far as its header declares and
    MAX_BYTES allows: a few MB of gzip can hold GBs."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            head = f.read(16)  # the magic and up to three dims
            if not head.startswith(b"\x00\x00"):
                raise DataError(f"{path}: a gzip file, but not of IDX images; accepted: {ACCEPTED}")
            dims = idx_dims(head, str(path))
            size = 4 + 4 * len(dims) + math.prod(dims)
            if size > MAX_BYTES:
                raise DataError(
                    f"{path}: IDX dims {dims} declare {_size(size)}, more than the limit of "
                    f"{_size(MAX_BYTES)}"
                )
            return head + f.read(size + 1 - len(head))  # one byte more shows a longer body
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None


def _idx_images(data: bytes, path: Path) -> list[tuple[str, np.ndarray]]:
    """The images of an IDX file, read as the fetch stage reads the datasets' files."""
    x = parse_idx(data, str(path))
    if x.ndim == 1:
        raise DataError(f"{path}: an IDX label file, not images")
    if x.shape[1:] != (SIDE, SIDE):
        raise DataError(f"{path}: IDX images must be N x 28 x 28, got dims {x.shape}")
    if len(x) == 0:
        raise DataError(f"{path}: IDX file holds no images (dims {x.shape})")
    return [(f"{path}[{i}]", x[i]) for i in range(len(x))]


def _npy_images(data: bytes, path: Path) -> list[tuple[str, np.ndarray]]:
    f = io.BytesIO(data)
    shape, dtype, fortran = _npy_header(f, str(path))
    images = _array_images(_npy_body(f, len(data), shape, dtype, fortran, str(path)), str(path))
    if images is None:
        raise DataError(
            f"{path}: expected an array of shape (28, 28) or (N, 28, 28), got {shape} {dtype}"
        )
    return images


def _npz_images(data: bytes, path: Path) -> list[tuple[str, np.ndarray]]:
    """Every image-shaped array in the archive; others (labels, say) are skipped unread.

    Read with zipfile, not np.load: a member's declared size bounds what it decompresses to
    (zipfile stops there), and its .npy header is checked before its array is allocated.
    """
    images: list[tuple[str, np.ndarray]] = []
    found: list[str] = []
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as npz:
            members = [m for m in npz.infolist() if m.filename.endswith(".npy")]
            total = sum(m.file_size for m in members)
            if total > MAX_BYTES:
                raise DataError(
                    f"{path}: its arrays decompress to {_size(total)}, more than the limit of "
                    f"{_size(MAX_BYTES)}"
                )
            for member in members:
                key, label = member.filename.removesuffix(".npy"), f"{path}:{member.filename}"
                with npz.open(member) as f:
                    shape, dtype, fortran = _npy_header(f, label)
                    found.append(f"{key} {shape}")
                    if not _image_shaped(shape):
                        continue
                    a = _npy_body(f, member.file_size, shape, dtype, fortran, label)
                images += _array_images(a, f"{path}:{key}") or []
    except DataError:
        raise
    except (ValueError, OSError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression
        raise DataError(f"{path}: not a .npz we can read ({exc})") from None
    if not images:
        raise DataError(
            f"{path}: no array of shape (28, 28) or (N, 28, 28) with N > 0; "
            f"found {', '.join(found) or 'no .npy arrays'}"
        )
    return images


def _npy_header(f: BinaryIO, name: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran order) from a .npy header; refuses pickled objects."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"format version {version} is not one numpy writes for images")
    except (ValueError, EOFError, OSError) as exc:
        raise DataError(f"{name}: not a .npy array we can read ({exc})") from None
    if dtype.hasobject:
        raise DataError(f"{name}: holds Python objects, which only pickle reads; refused")
    return shape, dtype, fortran


def _npy_body(
    f: BinaryIO, size: int, shape: tuple[int, ...], dtype: np.dtype, fortran: bool, name: str
) -> np.ndarray:
    """The array after a .npy header, read only if the header's shape matches the bytes there."""
    declared, there = math.prod(shape) * dtype.itemsize, size - f.tell()
    if declared != there:
        raise DataError(
            f"{name}: header declares shape {shape} of {dtype} = {_size(declared)}, "
            f"but {_size(there)} follow it"
        )
    body = f.read(declared)
    if len(body) != declared:
        raise DataError(f"{name}: truncated array ({len(body)} of {declared} bytes)")
    try:
        return np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    except ValueError as exc:  # a dtype of no size, say
        raise DataError(f"{name}: not a .npy array we can read ({exc})") from None


def _image_shaped(shape: tuple[int, ...]) -> bool:
    return shape == (SIDE, SIDE) or (len(shape) == 3 and shape[1:] == (SIDE, SIDE) and shape[0] > 0)


def _array_images(a: np.ndarray, label: str) -> list[tuple[str, np.ndarray]] | None:
    """(label, image) for a [28, 28] or non-empty [N, 28, 28] array; None for any other shape."""
    if a.shape == (SIDE, SIDE):
        return [(label, _pixels(a, label))]
    if _image_shaped(a.shape):
        x = _pixels(a, label)
        return [(f"{label}[{i}]", x[i]) for i in range(len(x))]
    return None


def _pixels(a: np.ndarray, name: str) -> np.ndarray:
    """uint8 0-255 from integers 0-255 or floats 0-1 / 0-255 (the two ways arrays are kept)."""
    if np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise DataError(f"{name}: integer pixels must lie in 0-255, got {a.min()}..{a.max()}")
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DataError(f"{name}: float pixels must be finite, found NaN or infinity")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{name}: float pixels must lie in 0-1 or 0-255, got {lo:g}..{hi:g}")
        scale = 255.0 if hi <= 1 else 1.0
        return np.rint(a.astype(np.float64) * scale).astype(np.uint8)
    raise DataError(f"{name}: pixels must be integers 0-255 or floats 0-1, got dtype {a.dtype}")


# ---- pictures: PNG, JPEG ------------------------------------------------------------------------


def picture(data: bytes, name: str, dataset: str, accepted: str = "PNG, JPEG") -> np.ndarray:
    """A PNG or JPEG file's bytes -> uint8 [28, 28] as the dataset stores its images.

    Raises DataError naming `name` and why; the served model converts files with it too.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    too_large = f"more than the limit of {MAX_PIXELS / 1e6:g} megapixels; scale it down first"
    try:
        with warnings.catch_warnings():  # Pillow's DecompressionBombWarning: MAX_PIXELS decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
        with im:
            size = im.size
            if size[0] * size[1] > MAX_PIXELS:  # declared in the header: checked before decoding
                raise DataError(f"{name}: image is {size[0]}x{size[1]} px, {too_large}")
            im.load()
            grey = _grey(ImageOps.exif_transpose(im))  # phones store photos turned, with a tag
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a format we read; accepted: {accepted}") from None
    except Image.DecompressionBombError:  # Pillow's own limit, far above MAX_PIXELS
        raise DataError(f"{name}: image is {too_large}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{name}: corrupt or truncated image ({exc})") from None
    if min(size) < MIN_SIZE:
        thing = "digit" if dataset == "mnist" else "product"
        raise DataError(
            f"{name}: image is {size[0]}x{size[1]} px, too small to hold a {thing} "
            f"(at least {MIN_SIZE}x{MIN_SIZE})"
        )
    ink = _ink(grey)
    if ink.max() < MIN_CONTRAST:
        raise DataError(f"{name}: blank image, nothing to classify")
    return _mnist(ink) if dataset == "mnist" else _fashion(ink)


def _grey(im: Image.Image) -> np.ndarray:
    """float32 grey 0-255 of any mode; transparency shows the white paper it would be seen on."""
    if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit PNGs
        return np.asarray(im, dtype=np.float32) * (255 / 65535)
    if "A" in im.mode or "a" in im.mode or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), rgba)
    return np.asarray(im.convert("L"), dtype=np.float32)


def _ink(grey: np.ndarray) -> np.ndarray:
    """Ink above the background, bright on dark as both datasets store it.

    The border's median tells the background: light paper (> 127) is inverted.
    """
    border = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    background = float(np.median(border))
    if background > 127:
        grey, background = 255 - grey, 255 - background
    return np.clip(grey - background, 0, None)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the True pixels, as Pillow's box takes it."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _fit(ink: np.ndarray, box: tuple[int, int, int, int], longer: int) -> np.ndarray:
    """The box scaled, aspect kept, to `longer` px on its longer side; Lanczos anti-aliases.

    Resizing the box within the whole image lets the filter see the faint edges around it.
    """
    w, h = box[2] - box[0], box[3] - box[1]
    scale = longer / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = Image.fromarray(ink.astype(np.float32)).resize(size, Image.Resampling.LANCZOS, box=box)
    return np.clip(np.asarray(out), 0, 255)


def _place(patch: np.ndarray, top: int, left: int) -> np.ndarray:
    """The patch in a 28x28 frame at (top, left), clipped at the frame's borders, as uint8."""
    frame = np.zeros((SIDE, SIDE), dtype=np.float32)
    h, w = patch.shape
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, SIDE), min(left + w, SIDE)
    if r0 < r1 and c0 < c1:
        frame[r0:r1, c0:c1] = patch[r0 - top : r1 - top, c0 - left : c1 - left]
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def _mnist(ink: np.ndarray) -> np.ndarray:
    """LeCun et al.: the digit's box to 20 px, its centre of mass to (14, 14) of 28x28.

    Ink is stretched so its strongest pixel is 255, as in every MNIST digit (max 254-255).
    """
    ink = ink * (255 / ink.max())
    patch = _fit(ink, _box(ink > DIGIT_INK * 255), DIGIT_BOX)
    patch *= 255 / max(float(patch.max()), 1.0)
    rows, cols = np.indices(patch.shape)
    mass = float(patch.sum())
    com_row, com_col = (rows * patch).sum() / mass, (cols * patch).sum() / mass
    top, left = int(np.floor(CENTRE - com_row + 0.5)), int(np.floor(CENTRE - com_col + 0.5))
    return _place(patch, top, left)


def _fashion(ink: np.ndarray) -> np.ndarray:
    """Xiao et al.: trim to the product, longest edge to 28, centred in 28x28.

    An odd margin leaves its extra pixel above and to the left, as in the dataset's images.
    """
    patch = _fit(ink, _box(ink > PRODUCT_TRIM * 255), SIDE)
    h, w = patch.shape
    return _place(patch, (SIDE - h + 1) // 2, (SIDE - w + 1) // 2)
