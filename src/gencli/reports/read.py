"""Reading a run folder that may come from a stranger: data only, never code, every problem a note.

Every reader here takes the :class:`Notes` of the report being built. A file that is missing returns None
(the caller knows whether that matters and says so); a file that is there but cannot be used (corrupt, too
large, not what its name says) returns None *and* adds a note naming the file and the problem, so the report
shows it instead of failing or silently leaving a piece out. JSON and YAML are parsed as data (``json``,
``yaml.safe_load``), CSV as text, images are decoded and re-encoded by Pillow; nothing is unpickled, no
OmegaConf resolver runs (:func:`resolve_references` replaces ``${a.b}`` references itself and leaves any
``${resolver:...}`` call as written: a stranger's ``${oc.env:SECRET}`` must not end up in a report you share).

:func:`open_inside` is the one door every file a report reads goes through (configs, records, CSVs, images, the
checkpoints it hashes). Each reader names the folder it reads for (``root``: the run or sweep being reported, or an
eval/sample run of its checkpoints) and a file is read only when it is a regular file whose real path lies inside
that folder: a symbolic link that leads out of it (``.hydra/config.yaml -> /etc/passwd``) is left out with a note,
and so are devices, pipes and sockets (a FIFO would hang the report, ``/dev/zero`` never end). Links that stay inside
(``last.ckpt -> epoch_3.ckpt``) are followed. Each kind of file has a size cap: a bigger file is left out with a
note, and no read goes past the cap even if the file grows while it is read.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gencli.safety import lies_inside

#: Bigger files are not read (a report is a summary; these bounds are far above what gencli writes).
MAX_TEXT_BYTES = 8 * 2**20
MAX_CSV_BYTES = 256 * 2**20
MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
#: An embedded image is scaled down to at most this many pixels on its long side (keeps the HTML small).
MAX_IMAGE_SIDE = 1024


class Notes(list):
    """What could not be read, one line per problem, shown near the top of the report."""

    def add(self, path: Path | str, problem: str) -> None:
        self.append(f"{path}: {problem}")


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size} bytes"


def open_inside(path: Path, notes: Notes, *, root: Path, limit: int) -> BinaryIO | None:
    """``path`` opened for reading (binary), or None: missing (no note: the caller says whether that matters), or
    not a regular file inside ``root`` once every link is followed, or more than ``limit`` bytes (each with a note).

    The real path is checked against the real path of ``root``, and that resolved path is what gets opened, with
    ``O_NOFOLLOW`` (no link swapped in at the last step) and ``O_NONBLOCK`` (a pipe cannot block the open); the
    opened file itself must be a regular file no larger than ``limit``."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    try:
        real, base = os.path.realpath(path), os.path.realpath(root)
    except (OSError, ValueError) as err:
        notes.add(path, f"cannot be read ({getattr(err, 'strerror', None) or err}); left out")
        return None
    if not lies_inside(real, base):
        notes.add(path, f"is a symbolic link (or lies below one) that leads outside {root}; not read: a report reads "
                        "only the files inside the folder it reports")
        return None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:  # a link inside the folder to a file that is not there: as missing
        return None
    except OSError as err:
        notes.add(path, f"cannot be read ({err.strerror or err}); left out")
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            what = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
            notes.add(path, f"is {what}, not a regular file; not read")
            os.close(fd)
            return None
        if info.st_size > limit:
            notes.add(path, f"is {_mib(info.st_size)}, more than the {_mib(limit)} a report reads of such a file; "
                            "left out")
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, notes: Notes, *, root: Path, limit: int) -> bytes | None:
    """The whole file (at most ``limit`` bytes; a file that grew past it while read is left out with a note)."""
    f = open_inside(path, notes, root=root, limit=limit)
    if f is None:
        return None
    try:
        with f:
            data = f.read(limit + 1)
    except OSError as err:
        notes.add(path, f"cannot be read ({err.strerror or err}); left out")
        return None
    if len(data) > limit:
        notes.add(path, f"grew past the {_mib(limit)} a report reads of such a file while it was read; left out")
        return None
    return data


def leads_outside(path: Path, root: Path) -> bool:
    """Whether ``path``, once every link is followed, lies outside ``root`` (for folders a report would list)."""
    return not lies_inside(path, root)


def file_size(path: Path, root: Path) -> int | None:
    """The size of a regular file whose real path is inside ``root``; None for anything else (nothing is read)."""
    try:
        real = os.path.realpath(path)
        if not lies_inside(real, root):
            return None
        info = os.stat(real, follow_symlinks=False)
    except (OSError, ValueError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def sha256_of(path: Path, notes: Notes, *, root: Path, limit: int) -> str | None:
    """The SHA-256 of a file inside ``root`` (read in blocks, at most ``limit`` bytes), or None with a note."""
    import hashlib

    f = open_inside(path, notes, root=root, limit=limit)
    if f is None:
        return None
    digest, seen = hashlib.sha256(), 0
    try:
        with f:
            for block in iter(lambda: f.read(2**20), b""):
                seen += len(block)
                if seen > limit:
                    notes.add(path, f"grew past {_mib(limit)} while it was hashed; not hashed")
                    return None
                digest.update(block)
    except OSError as err:
        notes.add(path, f"cannot be read to hash ({err.strerror or err})")
        return None
    return digest.hexdigest()


def read_text(path: Path, notes: Notes, *, root: Path, limit: int | None = None) -> str | None:
    """The file as UTF-8 text (undecodable bytes replaced), at most ``limit`` bytes (:data:`MAX_TEXT_BYTES`)."""
    data = read_bytes(path, notes, root=root, limit=MAX_TEXT_BYTES if limit is None else limit)
    return None if data is None else data.decode("utf-8", errors="replace")


def read_json(path: Path, notes: Notes, *, root: Path, limit: int | None = None) -> dict | None:
    """A JSON object, or None (missing; or corrupt / not an object, with a note)."""
    text = read_text(path, notes, root=root, limit=limit)
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


def read_yaml(path: Path, notes: Notes, *, root: Path) -> Any:
    """YAML as plain data (``yaml.safe_load``: no tags that build objects), or None with a note."""
    import yaml

    text = read_text(path, notes, root=root)
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


def read_curves(path: Path, notes: Notes, *, root: Path) -> Curves | None:
    """``csv/metrics.csv`` (Lightning's CSVLogger): one row per logging call, blank where a column was not logged."""
    raw = open_inside(path, notes, root=root, limit=MAX_CSV_BYTES)
    if raw is None:
        return None
    curves, failed, garbled = Curves(), False, 0
    try:
        with io.TextIOWrapper(io.BufferedReader(Bounded(raw, MAX_CSV_BYTES)), newline="", encoding="utf-8",
                              errors="replace") as f:
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


class Bounded(io.RawIOBase):
    """A binary file read no further than ``limit`` bytes (a file that grows while it is read ends there)."""

    def __init__(self, f: BinaryIO, limit: int):
        self.f, self.left = f, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            return 0
        data = self.f.read(min(len(buffer), self.left))
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


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


def read_image(path: Path, notes: Notes, *, root: Path) -> Picture | None:
    data = read_bytes(path, notes, root=root, limit=MAX_IMAGE_BYTES)
    if data is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
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
