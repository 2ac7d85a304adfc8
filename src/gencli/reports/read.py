"""Reading a run folder that may come from a stranger: data only, never code, every problem a note.

Every reader here takes the :class:`Notes` of the report being built. A file that is missing returns None
(the caller knows whether that matters and says so); a file that is there but cannot be used (corrupt, too
large, not what its name says) returns None *and* adds a note naming the file and the problem, so the report
shows it instead of failing or silently leaving a piece out. JSON and YAML are parsed as data (``json``,
``yaml.safe_load``), CSV as text, images are decoded and re-encoded by Pillow; nothing is unpickled, no
OmegaConf resolver runs (:func:`resolve_references` replaces ``${a.b}`` references itself and leaves any
``${resolver:...}`` call as written: a stranger's ``${oc.env:SECRET}`` must not end up in a report you share).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Bigger files are not read (a report is a summary; these bounds are far above what gencli writes).
MAX_TEXT_BYTES = 32 * 2**20
MAX_CSV_BYTES = 256 * 2**20
MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
#: An embedded image is scaled down to at most this many pixels on its long side (keeps the HTML small).
MAX_IMAGE_SIDE = 1024


class Notes(list):
    """What could not be read, one line per problem, shown near the top of the report."""

    def add(self, path: Path | str, problem: str) -> None:
        self.append(f"{path}: {problem}")


def _size_ok(path: Path, limit: int, notes: Notes) -> bool:
    try:
        size = path.stat().st_size
    except OSError as err:
        notes.add(path, f"cannot be read ({err.strerror or err})")
        return False
    if size > limit:
        notes.add(path, f"{size / 2**20:.0f} MiB, more than the {limit // 2**20} MiB a report reads; left out")
        return False
    return True


def read_text(path: Path, notes: Notes, limit: int = MAX_TEXT_BYTES) -> str | None:
    if not path.is_file():
        return None
    if not _size_ok(path, limit, notes):
        return None
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        notes.add(path, f"cannot be read ({err.strerror or err})")
        return None


def read_json(path: Path, notes: Notes) -> dict | None:
    """A JSON object, or None (missing; or corrupt / not an object, with a note)."""
    text = read_text(path, notes)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        notes.add(path, f"is not valid JSON ({' '.join(str(err).split())[:160]}); left out")
        return None
    if not isinstance(data, dict):
        notes.add(path, f"holds a JSON {type(data).__name__}, not an object; left out")
        return None
    return data


def read_yaml(path: Path, notes: Notes) -> Any:
    """YAML as plain data (``yaml.safe_load``: no tags that build objects), or None with a note."""
    import yaml

    text = read_text(path, notes)
    if text is None:
        return None
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader
    except (yaml.YAMLError, RecursionError) as err:
        notes.add(path, f"is not valid YAML ({' '.join(str(err).split())[:160]}); left out")
        return None


# ----------------------------------------------------------------------------- config references
REFERENCE = re.compile(r"\$\{([A-Za-z_][\w\-]*(?:\.[\w\-]+)*)\}")
MAX_NODES = 200_000


class TooLarge(Exception):
    pass


def resolve_references(tree: Any) -> Any:
    """``tree`` with every ``${a.b.c}`` that names another key of the same tree replaced by its value (as
    OmegaConf would); resolver calls (``${oc.env:X}``, ``${now:...}``) and references that lead nowhere or in a
    circle are left as written. Raises :class:`TooLarge` for a tree past :data:`MAX_NODES` (YAML aliases can make
    a small file a huge tree)."""
    budget = [MAX_NODES]

    def lookup(dotted: str) -> tuple[bool, Any]:
        node = tree
        for part in dotted.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return False, None
        return True, node

    def value(item: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise TooLarge
        if isinstance(item, dict):
            return {key: value(child, depth) for key, child in item.items()}
        if isinstance(item, list):
            return [value(child, depth) for child in item]
        if not isinstance(item, str) or "${" not in item or depth > 16:
            return item
        whole = REFERENCE.fullmatch(item)
        if whole:
            found, target = lookup(whole.group(1))
            return value(target, depth + 1) if found else item

        def one(match: re.Match) -> str:
            found, target = lookup(match.group(1))
            target = value(target, depth + 1) if found else None
            return str(target) if found and not isinstance(target, dict | list) else match.group(0)

        return REFERENCE.sub(one, item)

    return value(tree, 0)


# ----------------------------------------------------------------------------- logged curves
@dataclass
class Curves:
    """Every numeric column of a Lightning ``metrics.csv`` as (steps, values), blanks and non-numbers dropped."""

    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    non_finite: dict[str, int] = field(default_factory=dict)  # per column: inf/nan values left out of the plots


#: Columns that say when a value was logged, not what was measured.
INDEX_COLUMNS = ("step", "epoch", "created_at")
MAX_CSV_ROWS = 2_000_000


def read_curves(path: Path, notes: Notes) -> Curves | None:
    """``csv/metrics.csv`` (Lightning's CSVLogger): one row per logging call, blank where a column was not logged."""
    if not path.is_file():
        return None
    if not _size_ok(path, MAX_CSV_BYTES, notes):
        return None
    curves, failed, garbled = Curves(), False, 0
    try:
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            columns = [c for c in (reader.fieldnames or []) if c is not None]
            if "step" not in columns:
                notes.add(path, "has no 'step' column; its values are plotted against their row number")
            for row_number, row in enumerate(reader):
                if row_number >= MAX_CSV_ROWS:
                    notes.add(path, f"has more than {MAX_CSV_ROWS} rows; only the first {MAX_CSV_ROWS} are plotted")
                    break
                step = number(row.get("step")) if "step" in columns else float(row_number)
                if step is None or not math.isfinite(step):
                    garbled += row.get("step") not in (None, "")
                    continue
                for column in columns:
                    if column in INDEX_COLUMNS:
                        continue
                    cell = row.get(column)
                    value = number(cell)
                    if value is None:
                        if cell not in (None, ""):
                            garbled += 1
                        continue
                    if not math.isfinite(value):
                        curves.non_finite[column] = curves.non_finite.get(column, 0) + 1
                        continue
                    steps, values = curves.series.setdefault(column, ([], []))
                    steps.append(step)
                    values.append(value)
    except (csv.Error, UnicodeError, OSError) as err:
        failed = True
        notes.add(path, f"could not be read as CSV ({' '.join(str(err).split())[:160]}); "
                        f"{'its curves are partial' if curves.series else 'no curves'}")
    if garbled:
        notes.add(path, f"{garbled} cell(s) are not numbers (a corrupt or foreign file?); they are left out of the plots")
    if not curves.series and not failed:
        notes.add(path, "holds no numeric values to plot")
    return curves


def number(text: Any) -> float | None:
    if text is None:
        return None
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return float(text)
    text = str(text).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- images
@dataclass
class Picture:
    """A PNG ready to embed: decoded by Pillow and encoded again (so it is an image, and nothing else)."""

    png: bytes
    width: int
    height: int
    source: Path


def read_image(path: Path, notes: Notes) -> Picture | None:
    if not path.is_file():
        return None
    if not _size_ok(path, MAX_IMAGE_BYTES, notes):
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                notes.add(path, f"is {image.width}x{image.height} pixels, more than a report embeds; left out")
                return None
            image.load()  # decodes every pixel: a truncated or corrupt file fails here, not in the browser
            picture = image.convert("RGBA" if "A" in image.getbands() else "RGB" if image.mode not in ("L",) else "L")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        notes.add(path, f"is not a readable image ({' '.join(str(err).split())[:160]}); left out")
        return None
    if max(picture.size) > MAX_IMAGE_SIDE:
        picture.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), Image.Resampling.NEAREST)  # grids: keep pixels sharp
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return Picture(buffer.getvalue(), picture.width, picture.height, path)
