"""Reading user images safely: EXIF orientation, every mode converted to RGB, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flatlora_diffusion.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MASK_SUFFIX = ".mask.png"  # a loss mask beside its image (data/masks.py), never a training image itself


def list_images(folder: str | Path, what: str = "instance") -> list[Path]:
    """Image files of `folder`, sorted by name; a missing, unreadable or image-less folder raises."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"{what} folder is not a folder: {folder}")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except PermissionError:
        raise UserError(f"{what} folder is not readable: {folder}") from None
    if not files:
        raise UserError(f"{what} folder is empty: {folder}")
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.lower().endswith(MASK_SUFFIX)]
    if not images:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) among the {len(files)} files in {folder}")
    return images


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image with its EXIF orientation applied, as 8-bit RGB.

    Grayscale, palette, RGBA/LA (composited on white), CMYK and 16-bit images are converted.
    """
    return to_rgb(open_oriented(path))


def open_oriented(path: str | Path, what: str = "image") -> Image.Image:
    """The decoded image with its EXIF orientation applied; an unreadable file raises, naming it."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read {what} {path}: {err}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        img = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return background
    return img.convert("RGB")


def read_caption(image_path: Path, extension: str) -> str | None:
    caption_file = image_path.with_suffix(extension)
    if not caption_file.is_file():
        return None
    text = caption_file.read_text(encoding="utf-8", errors="replace").strip()
    return text or None
