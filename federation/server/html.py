"""A small HTML/SVG builder that escapes by default: the console's only way to write markup.

Everything the console shows may come from someone else: commit subjects, validation messages,
NACK texts and triggers are written by whoever can push to the fleet repo or run a proxy. So text
is escaped unless it is `Html` (markup this module built), and there is no way to pass a raw
string through: `h(tag, *children, **attrs)` escapes every str child and every attribute value.
Tag and attribute names come from our code only (keyword names: `class_` → `class`,
`hx_get` → `hx-get`, `data_cluster` → `data-cluster`; `viewBox` stays as written).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping

VOID_TAGS = frozenset({"br", "hr", "img", "input", "link", "meta", "col", "source"})


class Html(str):
    """Markup built here: safe to put into a page as it is."""

    __slots__ = ()


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _flatten(children: Iterable[object]) -> Iterable[object]:
    for c in children:
        if c is None or c is False:
            continue
        if isinstance(c, str | int | float):
            yield c
        elif isinstance(c, Iterable) and not isinstance(c, Mapping | bytes):
            yield from _flatten(c)
        else:
            raise TypeError(f"cannot put a {type(c).__name__} into markup: give str, a number or Html")


def text(value: object) -> Html:
    return Html(esc(value))


def join(children: Iterable[object]) -> Html:
    """Children (escaped unless `Html`) concatenated, as one piece of markup."""
    return Html("".join(c if isinstance(c, Html) else esc(c) for c in _flatten(children)))


def h(tag: str, *children: object, **attrs: object) -> Html:
    """`<tag attrs>children</tag>`; attribute values None/False are left out, True is a bare name."""
    out = [f"<{tag}"]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        name = key.rstrip("_").replace("_", "-")
        out.append(f" {name}" if value is True else f' {name}="{esc(value)}"')
    out.append(">")
    if tag in VOID_TAGS:
        return Html("".join(out))
    out.append(join(children))
    out.append(f"</{tag}>")
    return Html("".join(out))
