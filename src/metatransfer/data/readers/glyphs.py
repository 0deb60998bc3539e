"""``glyphs``: a built-in few-shot dataset rendered from the fonts that ship with matplotlib.

Like Omniglot, classes are characters grouped into alphabets (Unicode scripts and symbol blocks) and the
splits are disjoint sets of alphabets, so test classes come from scripts never seen in training. Each class
has 20 instances: its character drawn in the DejaVu / STIX faces that really contain it, each with a
seeded random affine warp (rotation, scale, aspect, shear, shift) and stroke-width change. Everything is a
pure function of the font files and the constants below, so every machine with the same matplotlib gets
the same images. Images are rendered at ``CANVAS`` px (dark ink on white, like Omniglot); the store
resizes them (to 28 px by default) and caches them.
"""

from __future__ import annotations

import math
import threading
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .base import ImageSource, Reader, SplitSpec, register_reader, stat_token

GENERATOR_VERSION = 2  # bump when the rendering changes, so caches are rebuilt
SEED = 20190616  # fixed: the dataset is a constant, not a run setting
INSTANCES = 20
CANVAS = 64  # render side; fine enough for stroke-width changes before downsampling
FONT_PX = 40  # glyphs keep their natural size within the em box, so 'o' and 'O' stay different
MIN_FACES = 4  # a character needs at least this many faces, for visual variety
MAX_PER_ALPHABET = 40
MIN_PER_ALPHABET = 10
DUPLICATE_CORRELATION = 0.93  # homoglyphs (Latin A / Greek Alpha / Cyrillic A) correlate at ~1.0

FACES = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
)

# alphabet -> code point ranges (inclusive). Order matters: among look-alikes the earlier alphabet keeps it.
ALPHABETS: dict[str, tuple[tuple[int, int], ...]] = {
    "Latin": ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)),
    "Cyrillic": ((0x410, 0x44F), (0x460, 0x4FF)),
    "Armenian": ((0x531, 0x587),),
    "Arabic": ((0x621, 0x64A),),
    "IPA": ((0x250, 0x2AF),),
    "Arrows": ((0x2190, 0x21FF),),
    "Mathematical_Operators": ((0x2200, 0x22FF),),
    "Box_Drawing": ((0x2500, 0x257F),),
    "Geometric_Shapes": ((0x25A0, 0x25FF),),
    "Miscellaneous_Symbols": ((0x2600, 0x26FF),),
    "Braille": ((0x2801, 0x28FF),),
    "Georgian": ((0x10A0, 0x10FF),),
    "Letterlike_Symbols": ((0x2100, 0x214F),),
    "Old_Italic": ((0x10300, 0x1032F),),
    "Hebrew": ((0x5D0, 0x5EA),),
    "Greek": ((0x391, 0x3C9),),
    "Lao": ((0xE81, 0xEDD),),
    "Canadian_Syllabics": ((0x1401, 0x167F),),
    "Miscellaneous_Technical": ((0x2300, 0x23FF),),
    "Dingbats": ((0x2700, 0x27BF),),
}
# Roughly 60 / 15 / 25 % of the classes, letters and symbols in every split.
SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "Latin",
        "Cyrillic",
        "Armenian",
        "Arabic",
        "IPA",
        "Arrows",
        "Mathematical_Operators",
        "Box_Drawing",
        "Geometric_Shapes",
        "Miscellaneous_Symbols",
        "Braille",
    ),
    "val": ("Georgian", "Letterlike_Symbols", "Old_Italic", "Hebrew"),
    "test": ("Greek", "Lao", "Canadian_Syllabics", "Miscellaneous_Technical", "Dingbats"),
}


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder (``mpl-data/fonts/ttf``)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


_LOCAL = threading.local()


def _font(path: str) -> ImageFont.FreeTypeFont:
    """A FreeType face per thread (a FreeType face must not be used by two threads at once)."""
    cache: dict[str, ImageFont.FreeTypeFont] = _LOCAL.__dict__.setdefault("fonts", {})
    if path not in cache:
        cache[path] = ImageFont.truetype(path, FONT_PX)
    return cache[path]


def _draw(char: str, font_path: str) -> Image.Image:
    """``char`` as white ink on black, centred on the em box of a ``CANVAS`` x ``CANVAS`` "L" image."""
    img = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(img).text((CANVAS / 2, CANVAS / 2), char, font=_font(font_path), fill=255, anchor="mm")
    return img


def _affine(rng: np.random.Generator) -> tuple[float, float, float, float, float, float]:
    """PIL AFFINE coefficients (output -> input mapping) of a random warp about the canvas centre:
    rotation, scale, aspect change, shear and shift. Plain floats: numpy is slow for 2x2 matrices."""
    angle, scale, log_aspect, shear, dx, dy = rng.uniform(
        [-math.radians(12), 0.85, -0.1, -0.2, -0.06 * CANVAS, -0.06 * CANVAS],
        [math.radians(12), 1.1, 0.1, 0.2, 0.06 * CANVAS, 0.06 * CANVAS],
    ).tolist()
    c, s = math.cos(angle), math.sin(angle)
    sx, sy = scale * math.exp(log_aspect), scale * math.exp(-log_aspect)
    # forward = rotation @ [[1, shear], [0, 1]] @ diag(sx, sy)
    a, b = c * sx, (c * shear - s) * sy
    d, e = s * sx, (s * shear + c) * sy
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    # Output pixel p maps to input centre + inv @ (p - centre - shift).
    half = CANVAS / 2
    px, py = half + dx, half + dy
    return (ia, ib, half - ia * px - ib * py, id_, ie, half - id_ * px - ie * py)


def _stroke(ink: np.ndarray, change: int) -> np.ndarray:
    """White ink [H, W] uint8 one pixel bolder (``change > 0``) or thinner (< 0): 3x3 max / min filter."""
    op = np.maximum if change > 0 else np.minimum
    p = np.pad(ink, 1, mode="edge")
    rows = op(op(p[:-2], p[1:-1]), p[2:])
    return op(op(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


@dataclass(frozen=True)
class GlyphSource(ImageSource):
    """Instance ``instance`` of character ``code`` drawn in face ``font_path``; rendered on ``load()``."""

    alphabet: str
    code: int
    instance: int
    font_path: str

    @property
    def key(self) -> str:  # type: ignore[override]
        return f"glyphs:{self.alphabet}/U+{self.code:04X}#{self.instance}({Path(self.font_path).name})"

    def stat_fingerprint(self) -> str:
        return f"v{GENERATOR_VERSION}:{stat_token(self.font_path)}"

    def load(self) -> np.ndarray:
        """The instance as ``[CANVAS, CANVAS, 1]`` uint8, dark ink on white."""
        rng = np.random.default_rng([SEED, self.code, self.instance])
        img = _draw(chr(self.code), self.font_path)
        img = img.transform((CANVAS, CANVAS), Image.Transform.AFFINE, _affine(rng), Image.Resampling.BILINEAR)
        ink = np.asarray(img, dtype=np.uint8)
        stroke = int(rng.integers(-1, 2))  # thinner, same, bolder
        if stroke > 0:
            ink = _stroke(ink, stroke)
        elif stroke < 0:
            thinner = _stroke(ink, stroke)
            # Hairline faces would vanish when eroded; keep them as they are.
            if np.count_nonzero(thinner > 127) * 2 >= np.count_nonzero(ink > 127):
                ink = thinner
        return (255 - ink)[:, :, None]


def _covering_faces(code: int, charmaps: list[set[int]], paths: list[str]) -> list[str]:
    return [p for p, cmap in zip(paths, charmaps, strict=True) if code in cmap]


def _fits(char: str, font_paths: list[str]) -> bool:
    """True when the glyph lies inside the central 90 % of the canvas in every face (no clipping)."""
    half = 0.45 * CANVAS
    for p in font_paths:
        left, top, right, bottom = _font(p).getbbox(char, anchor="mm")
        if min(left, top) < -half or max(right, bottom) > half:
            return False
    return True


def _signature(char: str, font_path: str) -> np.ndarray:
    """A blurred 28x28 rendering, zero-mean and unit-norm, for spotting look-alike characters. [784]"""
    img = (
        _draw(char, font_path).resize((28, 28), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1))
    )
    v = np.asarray(img, dtype=np.float32).ravel()
    v = v - v.mean()
    return v / (np.linalg.norm(v) + 1e-6)


@lru_cache(maxsize=1)
def select_characters() -> dict[str, list[tuple[int, list[str]]]]:
    """Per alphabet the chosen ``(code point, faces that contain it)``: glyphs present in at least
    ``MIN_FACES`` faces, not clipped, with enough ink, no look-alike of an earlier character; at most
    ``MAX_PER_ALPHABET`` spread evenly over the alphabet; alphabets below ``MIN_PER_ALPHABET`` dropped."""
    from matplotlib import ft2font

    paths = [str(font_dir() / f"{f}.ttf") for f in FACES if (font_dir() / f"{f}.ttf").is_file()]
    charmaps = [set(ft2font.FT2Font(p).get_charmap()) for p in paths]
    candidates: list[tuple[str, int, list[str]]] = []
    for alphabet, ranges in ALPHABETS.items():
        for lo, hi in ranges:
            for code in range(lo, hi + 1):
                if unicodedata.category(chr(code))[0] not in "LSN":  # letters, symbols, digits; no marks
                    continue
                faces = _covering_faces(code, charmaps, paths)
                if len(faces) >= MIN_FACES and _fits(chr(code), faces):
                    candidates.append((alphabet, code, faces))
    signatures = np.stack([_signature(chr(code), faces[0]) for _, code, faces in candidates])
    ink = np.array([np.count_nonzero(np.asarray(_draw(chr(c), f[0])) > 127) for _, c, f in candidates])
    # Too little ink (dots, thin marks) or too much (filled blocks) make poor classes.
    usable = (ink >= 0.02 * CANVAS**2) & (ink <= 0.5 * CANVAS**2)
    similarity = signatures @ signatures.T
    suppressed = ~usable
    survivors: dict[str, list[tuple[int, list[str]]]] = {a: [] for a in ALPHABETS}
    for i, (alphabet, code, faces) in enumerate(candidates):
        if suppressed[i]:
            continue
        survivors[alphabet].append((code, faces))
        suppressed |= similarity[i] > DUPLICATE_CORRELATION
    chosen = {}
    for alphabet, chars in survivors.items():
        if len(chars) < MIN_PER_ALPHABET:
            continue
        picks = np.unique(
            np.linspace(0, len(chars) - 1, min(MAX_PER_ALPHABET, len(chars))).round().astype(int)
        )
        chosen[alphabet] = [chars[i] for i in picks]
    return chosen


@register_reader
class GlyphsReader(Reader):
    name = "glyphs"
    layout = "no files needed: rendered from matplotlib's DejaVu/STIX fonts (root is ignored)"
    default_size = 28
    channels = 1
    needs_root = False

    def __init__(self, root: Path | str | None = None, **options: Any) -> None:
        super().__init__(None, **options)  # the root is ignored: nothing is read from disk but fonts

    def splits(self) -> list[str]:
        return list(self.expected_splits)

    def split(self, name: str) -> SplitSpec:
        self._check_split_name(name)
        chosen = select_characters()
        entries = sorted(
            (f"{alphabet}/U+{code:04X}", alphabet, code, faces)
            for alphabet in SPLITS[name]
            for code, faces in chosen.get(alphabet, [])
        )
        sources: list[list[ImageSource]] = [
            [GlyphSource(alphabet, code, j, faces[j % len(faces)]) for j in range(INSTANCES)]
            for _, alphabet, code, faces in entries
        ]
        return SplitSpec(name=name, classes=[e[0] for e in entries], sources=sources, channels=1)
