"""How an item becomes the text the encoder sees: a named template, and part of a catalog index's identity.

Built-in templates (`TEMPLATES`), each rendering the parts it names, in this order:

    title           "{title}. Genres: {categories, comma-separated}"            (the title alone without categories)
    rich            title, then the tagline, then the description (overview)
    rich-keywords   rich, then "Keywords: {up to 12 keywords, comma-separated}"

Parts are joined by ". ", or by a space after a part that already ends a sentence (".", "!", "?", "...").

An item without a description falls back to what it has (title and categories, plus its tagline and keywords
where the template names them); `TemplateUse` counts those items, and reports say how many there were.

Vectors embedded from two templates are not comparable, even by the same encoder: the index records
`TextTemplate.identity` (name and a hash of the template's definition) and is rebuilt or refused when the
template changes (`client.index.TemplateMismatch`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Iterable

from bert_recsys.client.catalog import Item

PARTS = ("title", "tagline", "description", "keywords")
ENDS = (".", "!", "?", "\u2026", '"')


@dataclass(frozen=True)
class TextTemplate:
    name: str
    parts: tuple[str, ...] = ("title",)
    category_label: str = "Genres"
    max_keywords: int = 12

    def __post_init__(self):
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts or self.parts[0] != "title":
            raise ValueError(f"template {self.name!r}: parts must start with 'title' and come from {PARTS}, "
                             f"got {self.parts}")
        if not self.name or any(c in self.name for c in " /@"):
            raise ValueError(f"template name {self.name!r}: a non-empty name without spaces, '/' or '@'")

    @property
    def identity(self) -> str:
        """`name@hash`: the hash covers the whole definition, so editing a template changes its identity."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.name}@{digest}"

    @property
    def rich(self) -> bool:
        return "description" in self.parts

    def render(self, item: Item) -> str:
        categories = ", ".join(item.categories)
        pieces = [f"{item.title}. {self.category_label}: {categories}" if categories else item.title]
        if "tagline" in self.parts and item.tagline:
            pieces.append(item.tagline)
        if "description" in self.parts and item.description:
            pieces.append(item.description)
        if "keywords" in self.parts and item.keywords:
            pieces.append("Keywords: " + ", ".join(item.keywords[: self.max_keywords]))
        text = pieces[0]
        for piece in pieces[1:]:  # a sentence ends once: "Roll the dice! An enchanted...", never "dice!. An"
            text = f"{text}{' ' if text.endswith(ENDS) else '. '}{piece.strip()}"
        return text

    def render_all(self, items: Iterable[Item]) -> list[str]:
        return [self.render(item) for item in items]


TEMPLATES = {t.name: t for t in (
    TextTemplate("title"),
    TextTemplate("rich", ("title", "tagline", "description")),
    TextTemplate("rich-keywords", ("title", "tagline", "description", "keywords")),
)}
# What a catalog index is embedded from unless told otherwise. Chosen on the validation split of the item
# cold-start protocol (docs/client.md, "Choosing the template"), never on the reported test split.
DEFAULT_TEMPLATE = "rich"


def by_identity(identity: str | None) -> TextTemplate | None:
    """The built-in template with this identity (`name@hash`), or None."""
    return next((t for t in TEMPLATES.values() if t.identity == identity), None)


def template(name: str | TextTemplate) -> TextTemplate:
    if isinstance(name, TextTemplate):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown item text template {name!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass(frozen=True)
class TemplateUse:
    """How a catalog rendered through a template: how many items had a description, how many fell back."""

    template: str
    items: int
    with_description: int

    @property
    def fallback(self) -> int:
        return self.items - self.with_description

    @classmethod
    def of(cls, chosen: TextTemplate, items: list[Item]) -> "TemplateUse":
        described = sum(1 for item in items if item.description) if chosen.rich else 0
        return cls(chosen.identity, len(items), described)

    def as_dict(self) -> dict:
        return {"template": self.template, "items": self.items, "with_description": self.with_description,
                "fallback_title_and_categories": self.fallback}
