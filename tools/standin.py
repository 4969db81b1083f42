"""``python -m tools.standin``: a full-size EMNIST stand-in in NIST's own archive layout.

NIST's ``gzip.zip`` cannot be fetched on the build machines, yet the pipeline's main case
is EMNIST byclass at full size (697,932 train / 116,323 test images, 62 classes). This
writes an archive crossport cannot tell from NIST's: the same member names
(``gzip/emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte.gz`` and
``gzip/emnist-<split>-mapping.txt``), the same IDX formats, the same per-split counts and
label ranges, images stored transposed (EMNIST orientation).

The images are learnable, not noise: each class is a character rendered with Pillow's
bundled font (so o/O/0 and l/I/1 are as confusable as in the real data), in random
rotations, sizes and stroke widths, shifted, dimmed and speckled per image. Same seed,
same bytes.

    python -m tools.standin --out ~/.cache/crossport/standin            # byclass, full size
    python -m tools.standin --out DIR --splits byclass --scale 0.05     # 1/20 of the counts
"""

from __future__ import annotations

import argparse
import gzip
import logging
import string
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

from crossport.cli import summary_line

log = logging.getLogger("crossport.standin")

DIGITS = string.digits
UPPER = string.ascii_uppercase
LOWER = string.ascii_lowercase
# bymerge and balanced fold the 15 letters whose cases look alike into the upper case.
MERGED_LOWER = "abdefghnqrt"

# split → (train count, test count, characters drawn for label 0.., first label): NIST's numbers.
SPLITS: dict[str, tuple[int, int, str, int]] = {
    "byclass": (697_932, 116_323, DIGITS + UPPER + LOWER, 0),
    "bymerge": (697_932, 116_323, DIGITS + UPPER + MERGED_LOWER, 0),
    "balanced": (112_800, 18_800, DIGITS + UPPER + MERGED_LOWER, 0),
    "letters": (124_800, 20_800, UPPER, 1),  # labels 1..26; upper or lower case drawn
    "digits": (240_000, 40_000, DIGITS, 0),
    "mnist": (60_000, 10_000, DIGITS, 0),
}
VARIANTS = 24  # pre-rendered glyphs per class; each image is one of them, moved and dimmed
CHUNK = 50_000


def render_glyphs(chars: str, rng: np.random.Generator, *, mixed_case: bool = False) -> np.ndarray:
    """[classes, VARIANTS, 28, 28] uint8 upright glyphs, white ink on black."""
    from PIL import Image, ImageDraw, ImageFont

    glyphs = np.zeros((len(chars), VARIANTS, 28, 28), dtype=np.uint8)
    for label, char in enumerate(chars):
        for variant in range(VARIANTS):
            drawn = char.lower() if mixed_case and variant % 2 else char
            font = ImageFont.load_default(size=int(rng.integers(16, 25)))
            canvas = Image.new("L", (56, 56))
            ImageDraw.Draw(canvas).text((28, 28), drawn, fill=255, font=font, anchor="mm",
                                        stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
            canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
            box = canvas.getbbox() or (0, 0, 56, 56)
            crop = canvas.crop(box)
            scale = 20.0 / max(crop.size)
            crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                               Image.BILINEAR)
            frame = Image.new("L", (28, 28))
            frame.paste(crop, ((28 - crop.width) // 2, (28 - crop.height) // 2))
            glyphs[label, variant] = np.asarray(frame)
    return glyphs


def class_weights(chars: str) -> np.ndarray:
    """Digits are about half of NIST's byclass; each digit class is drawn 5× as often as a letter."""
    weights = np.array([5.0 if char in DIGITS else 1.0 for char in chars])
    return weights / weights.sum()


def make_images(glyphs: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, 28, 28] uint8 upright images for ``labels`` (0-based): glyph, shift, dim, speckle."""
    count = len(labels)
    base = glyphs[labels, rng.integers(0, VARIANTS, count)].astype(np.float32)
    padded = np.pad(base, ((0, 0), (2, 2), (2, 2)))
    dy, dx = rng.integers(0, 5, count), rng.integers(0, 5, count)
    rows = dy[:, None] + np.arange(28)[None, :]
    cols = dx[:, None] + np.arange(28)[None, :]
    shifted = padded[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]
    dimmed = shifted * rng.uniform(0.6, 1.0, (count, 1, 1)).astype(np.float32)
    speckle = rng.normal(0.0, 12.0, dimmed.shape).astype(np.float32) * (rng.random(dimmed.shape) < 0.08)
    return np.clip(dimmed + speckle, 0, 255).astype(np.uint8)


def _member(name: str) -> zipfile.ZipInfo:
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed: same seed, same bytes


def write_split(bundle: zipfile.ZipFile, split: str, scale: float, seed: int) -> dict[str, int]:
    n_train, n_test, chars, first_label = SPLITS[split]
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])
    glyphs = render_glyphs(chars, rng, mixed_case=split == "letters")
    counts = {}
    for part, full in (("train", n_train), ("test", n_test)):
        count = max(1, round(full * scale))
        labels = rng.choice(len(chars), size=count, p=class_weights(chars))
        name = f"gzip/emnist-{split}-{part}"
        with bundle.open(_member(f"{name}-images-idx3-ubyte.gz"), "w", force_zip64=True) as member, \
                gzip.GzipFile(fileobj=member, mode="wb", compresslevel=1, mtime=0) as out:
            out.write(struct.pack(">IIII", 0x0803, count, 28, 28))
            for start in range(0, count, CHUNK):
                upright = make_images(glyphs, labels[start : start + CHUNK], rng)
                out.write(np.ascontiguousarray(upright.transpose(0, 2, 1)).tobytes())  # NIST stores them transposed
        with bundle.open(_member(f"{name}-labels-idx1-ubyte.gz"), "w") as member, \
                gzip.GzipFile(fileobj=member, mode="wb", mtime=0) as out:
            out.write(struct.pack(">II", 0x0801, count) + (labels + first_label).astype(np.uint8).tobytes())
        counts[part] = count
    mapping = "".join(f"{label + first_label} {ord(char)}\n" for label, char in enumerate(chars))
    bundle.writestr(_member(f"gzip/emnist-{split}-mapping.txt"), mapping)
    return counts


def write_archive(out: Path, splits: tuple[str, ...] = ("byclass",), scale: float = 1.0, seed: int = 0) -> Path:
    """Write ``out/gzip.zip`` (atomically: crossport.files.replace_atomic) and return its path."""
    from crossport.files import replace_atomic

    target = out / "gzip.zip"
    with replace_atomic(target) as partial, zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as bundle:
        for split in splits:
            counts = write_split(bundle, split, scale, seed)
            log.info("emnist-%s: %d train, %d test", split, counts["train"], counts["test"])
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.standin", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("--out", type=Path, required=True, help="directory for gzip.zip (a crossport --data-dir)")
    parser.add_argument("--splits", nargs="+", choices=tuple(SPLITS), default=["byclass"],
                        help="splits to write (default: byclass)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of NIST's counts (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    if not 0 < args.scale <= 1:
        sys.stderr.write(f"crossport: --scale must be in (0, 1], found {args.scale}.\n")
        return 2
    path = write_archive(args.out.expanduser(), tuple(args.splits), args.scale, args.seed)
    log.info("wrote %s (%.0f MB)", path, path.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
