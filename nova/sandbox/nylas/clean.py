"""A small HTML -> markdown cleaner for ``message.created.cleaned`` notifications.

Nylas's Clean Conversations (https://developer.nylas.com/docs/v3/email/parse-messages/ and
https://developer.nylas.com/docs/reference/notifications/messages/message-created-cleaned/)
delivers "cleaned markdown content instead of the original HTML" in ``body``; when cleaning
fails, ``cleaning_status`` is ``failed`` and ``body`` holds the original HTML.  Its documented
defaults are followed where a simple converter can: ``<script>``/``<style>`` always removed,
links, images and tables removed (``ignore_links``, ``ignore_images``, ``ignore_tables``
default to true), sign-off phrases such as "Best," removed (``remove_conclusion_phrases``),
quoted history (``<blockquote>``) dropped.

This is the sandbox's own approximation, written for its own bodies; it is not Nylas's model.
It "fails" (returns ``None``) on bodies it refuses to clean: over :data:`MAX_CLEAN_CHARS`
characters or with more than :data:`MAX_OPEN_TAGS` elements left unclosed -- which is what the
hostile mailbox's 300 KB of unclosed ``<div`` produces.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

MAX_CLEAN_CHARS = 200_000
MAX_OPEN_TAGS = 500
_DROP = {"script", "style", "head", "title", "table", "blockquote"}
_BLOCK = {"p", "div", "section", "article", "header", "footer", "ul", "ol", "pre", "tr"}
_SIGNOFF = re.compile(r"^(best|regards|best regards|kind regards|thanks|cheers|sincerely)"
                      r"[,!.]?$", re.IGNORECASE)
_VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}


class _Markdown(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.drop = 0
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _VOID:
            self.open.append(tag)
        if tag in _DROP:
            self.drop += 1
        if self.drop:
            return
        if tag in _BLOCK:
            self.out.append("\n\n")
        elif tag == "br":
            self.out.append("\n")
        elif tag in ("b", "strong"):
            self.out.append("**")
        elif tag in ("i", "em"):
            self.out.append("*")
        elif tag == "li":
            self.out.append("\n- ")
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self.out.append("\n\n" + "#" * int(tag[1]) + " ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.open:
            while self.open and self.open.pop() != tag:
                pass
        if tag in _DROP:
            self.drop = max(0, self.drop - 1)
            return
        if self.drop:
            return
        if tag in ("b", "strong"):
            self.out.append("**")
        elif tag in ("i", "em"):
            self.out.append("*")
        elif tag in _BLOCK or (len(tag) == 2 and tag[0] == "h"):
            self.out.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.drop:
            self.out.append(re.sub(r"[ \t\r\n]+", " ", data))


def html_to_markdown(body: str) -> str | None:
    """Cleaned markdown of an HTML body, or None when cleaning fails (too big, too broken)."""
    if len(body) > MAX_CLEAN_CHARS:
        return None
    parser = _Markdown()
    parser.feed(body)
    parser.close()
    if len(parser.open) > MAX_OPEN_TAGS:
        return None
    lines = [line.strip() for line in "".join(parser.out).split("\n")]
    kept: list[str] = []
    for line in lines:
        if _SIGNOFF.match(line):
            continue
        if line or (kept and kept[-1]):
            kept.append(line)
    return "\n".join(kept).strip()
