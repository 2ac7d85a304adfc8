"""Reading a gencli report back in tests: headings, table rows, and every embedded image, decoded."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

from PIL import Image


class Parsed(HTMLParser):
    """Headings, table rows (cell texts), images (decoded), every tag name, and all text."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[str] = []
        self.headings: list[str] = []
        self.rows: list[list[str]] = []
        self.row_classes: list[str] = []
        self.images: list[tuple[Image.Image, str]] = []
        self.texts: list[str] = []
        self._heading: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        elif tag == "tr":
            self.rows.append([])
            self.row_classes.append(attrs.get("class") or "")
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            src = attrs["src"]
            assert src.startswith("data:image/png;base64,"), src[:60]
            image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
            image.load()  # every pixel decodes
            assert image.format == "PNG" and image.width > 0 and image.height > 0
            self.images.append((image, attrs.get("alt") or ""))

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.texts.append(data)
        if self._heading is not None:
            self._heading.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def row(self, first: str) -> list[str]:
        return next(r for r in self.rows if r and r[0] == first)
