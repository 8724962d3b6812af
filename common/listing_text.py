"""THE text of a listing, as embedded for training, for the "text" index and for queries.

`listing_text(title, description)` and its helpers, in the standard library only, so services
that only need the string (the gateway builds query and catalogue texts for the embedder's
EmbedText) import no model code. `common.text` re-exports all of it.
"""

from __future__ import annotations

import math
import re

__all__ = ["MAX_DESCRIPTION_CHARS", "MAX_TITLE_CHARS", "listing_text", "normalise_text", "strip_boilerplate"]

#: Character budgets for `listing_text`. MiniLM reads at most 256 word pieces (about 1,000
#: characters of English) and truncates the rest, so the title goes first and the description
#: is cut, at a word boundary, well before a model would silently drop it. Titles are short
#: (Gumtree caps them near 100 characters); the cap only guards against abuse.
MAX_TITLE_CHARS = 200
MAX_DESCRIPTION_CHARS = 1000

_WHITESPACE = re.compile(r"\s+")
_MONTH = "(?:January|February|March|April|May|June|July|August|September|October|November|December)"
#: Gumtree's scraped footer "Posted by <name> in <category>, <subcategory> in <town>. <date>",
#: found in about 8% of the descriptions. It names the listing's category, i.e. the label, and
#: is no part of what a seller writes, so `listing_text` removes it (dated form first, then an
#: undated footer at the very end).
_POSTED_BY_DATED = re.compile(
    r"\s*Posted by\b.{0,300}?(?:\b\d{1,2}\.? %s,? \d{4}|\b%s \d{1,2}, \d{4})" % (_MONTH, _MONTH), re.DOTALL
)
_POSTED_BY_TAIL = re.compile(r"\s*Posted by\b[^\n]{0,60}? in [^\n]{0,240}$")


def normalise_text(value: object) -> str:
    """Any value -> one line of text: None/NaN -> "", runs of whitespace (newlines, tabs,
    the descriptions' bare carriage returns) -> one space, stripped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return _WHITESPACE.sub(" ", str(value)).strip()


def strip_boilerplate(description: str) -> str:
    """Remove the scraped "Posted by ... in <category> in <town>. <date>" footer (it leaks the
    category) from a description."""
    description = _POSTED_BY_DATED.sub(" ", description)
    return _POSTED_BY_TAIL.sub("", description)


def _truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, at the last space if there is one in the
    second half of the budget (so words are not split), else hard."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space >= limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-")


def listing_text(
    title: object,
    description: object = "",
    *,
    max_title_chars: int = MAX_TITLE_CHARS,
    max_description_chars: int = MAX_DESCRIPTION_CHARS,
) -> str:
    """THE text of a listing, as embedded for training, for the "text" index and for queries.

    ``"<title>. <description>"`` with whitespace collapsed, the scraped "Posted by ... in
    <category> ..." footer removed from the description (`strip_boilerplate`: it names the
    label), the title cut to ``max_title_chars`` and the description to
    ``max_description_chars`` at a word boundary; the separator is left
    out when the title already ends in punctuation, and a description that merely repeats the
    title is dropped. Either part may be empty (a query is just ``listing_text(query)``).
    """
    head = _truncate(normalise_text(title), max_title_chars)
    body = _truncate(normalise_text(strip_boilerplate(normalise_text(description))), max_description_chars)
    if not body or body.casefold() == head.casefold():
        return head
    if not head:
        return body
    separator = " " if head[-1] in ".!?:;," else ". "
    return f"{head}{separator}{body}"
