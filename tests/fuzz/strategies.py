"""Hypothesis strategies shared by the fuzz tests: JSON-like values and edits of a parsed document."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**20]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", "${oc.env:HOME}", "${model.latent_dim}", "../../etc/passwd", "~", "null", "1e999", "nan",
                     "gencli.families.autoencoder.Autoencoder", "os.system", "\x00", "é" * 10]),
)

JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)


def nested(depth: int, kind: str = "list") -> Any:
    """A value nested ``depth`` levels deep ([[[...]]] or {"a": {"a": ...}})."""
    value: Any = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a JSON-like document, the root included."""
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found += paths(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += paths(value, prefix + (index,))
    return found


def replace(document: Any, path: tuple, value: Any) -> Any:
    """A copy of ``document`` with the node at ``path`` replaced (the root when ``path`` is empty)."""
    if not path:
        return value
    document = copy.deepcopy(document)
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


def delete(document: Any, path: tuple) -> Any:
    if not path:
        return {}
    document = copy.deepcopy(document)
    node = document
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return document


@st.composite
def edits(draw, document: Any, value=JSON, deep_limit: int = 400) -> Any:
    """``document`` with one to three nodes replaced by generated values, deleted, or nested very deep."""
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(document)))
        how = draw(st.sampled_from(["value", "value", "value", "delete", "deep"]))
        if how == "delete" and where:
            document = delete(document, where)
        elif how == "deep":
            document = replace(document, where, nested(draw(st.integers(50, deep_limit)),
                                                       draw(st.sampled_from(["list", "dict"]))))
        else:
            document = replace(document, where, draw(value))
    return document


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` cut short, with bytes flipped, with a run of bytes zeroed, or replaced by junk."""
    how = draw(st.sampled_from(["truncate", "flip", "zero", "junk"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "junk":
        return draw(st.binary(max_size=512))
    data = bytearray(data)
    if how == "flip":
        for _ in range(draw(st.integers(1, 16))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    else:
        start = draw(st.integers(0, len(data) - 1))
        length = draw(st.integers(1, 4096))
        data[start: start + length] = bytes(len(data[start: start + length]))
    return bytes(data)
