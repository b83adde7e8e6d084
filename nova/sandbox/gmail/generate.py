"""Deterministic, lazy generation of Gmail sandbox mailboxes (message *specs*, not MIME yet).

Everything comes from ``random.Random`` seeded with strings built from the sandbox seed, the
user's index and the thread's index, so a seed (and anchor time) always yields the same users,
threads, messages, labels and attachment bytes.  Only thread dates are computed eagerly; a
thread's messages are made on first access (:class:`.mailbox.Mailbox` keeps an LRU cache), and
MIME bytes only when a message is fetched (:mod:`.mime`).  People, topics, sentences, thread
sizes (45% single-message threads, then 2, 3, up to 20) and the hostile strings and filenames
are shared with the Nylas sandbox (:mod:`nova.sandbox.nylas.generate`).

Gmail specifics modelled here:

* Ids are 16 lowercase hex digits, per user; a thread's id is the id of its first message,
  as Gmail's are (https://developers.google.com/workspace/gmail/api/guides/threads: "the
  thread ID is ... the ID of the first message" is how clients observe it; the reference only
  promises an opaque string, so clients must not rely on it).
* ``internalDate`` is epoch milliseconds (the Message resource: "The internal message creation
  timestamp (epoch ms)", https://developers.google.com/workspace/gmail/api/reference/rest/v1/
  users.messages#Message); ``historyId`` of a generated message lies below the mailbox's
  starting history id and grows with its date, with gaps.
* Labels: system labels (INBOX, SENT, UNREAD, STARRED, IMPORTANT, SPAM, TRASH, CATEGORY_*)
  and user labels ``Label_N`` (https://developers.google.com/workspace/gmail/api/guides/
  labels); a small share of threads sits in SPAM or TRASH, which lists leave out unless
  ``includeSpamTrash`` is set.
"""

from __future__ import annotations

import html
import random
from dataclasses import dataclass, field
from functools import lru_cache

from ..nylas.generate import (
    BROKEN_CHARSETS,
    CONTROL,
    DAY,
    HOSTILE_FILENAME_GROUPS,
    HUGE_BODY_EVERY,
    LATIN1_WORDS,
    NUL,
    RTL,
    SENTENCES,
    TOPICS,
    huge_unclosed_body,
    message_count,
    person,
    stable_hex,
)

Person = tuple[str, str]  # (display name, address)

SYSTEM_LABELS = ["CHAT", "SENT", "INBOX", "IMPORTANT", "TRASH", "DRAFT", "SPAM",
                 "CATEGORY_FORUMS", "CATEGORY_UPDATES", "CATEGORY_PERSONAL",
                 "CATEGORY_PROMOTIONS", "CATEGORY_SOCIAL", "STARRED", "UNREAD"]
USER_LABELS = [("Label_1", "Projects"), ("Label_2", "Receipts"), ("Label_3", "Clients/Acme"),
               ("Label_4", "Z\u00fcrich \u00e9quipe")]
CATEGORIES = [("CATEGORY_PERSONAL", 0.45), ("CATEGORY_UPDATES", 0.25),
              ("CATEGORY_PROMOTIONS", 0.15), ("CATEGORY_SOCIAL", 0.08),
              ("CATEGORY_FORUMS", 0.07)]
CP1252_BITS = ["\u201cquoted\u201d", "\u2013 dash", "\u20ac 120", "it\u2019s", "\u2026"]
UNICODE_NAMES = ["Zo\u00eb M\u00fcller", "Jos\u00e9 N\u00fa\u00f1ez", "\u00c5sa \u00d8stberg",
                 "Fran\u00e7oise L\u00e9vy"]
NON_ASCII_FILES = ["Pr\u00e4sentation Q3.pdf", "r\u00e9sum\u00e9 final.pdf",
                   "\u65e5\u672c\u8a9e.txt"]
EPOCH_BASE_DAYS = 520  # generated history ids count from here (before any generated date)


@dataclass
class PartSpec:
    """An attachment or inline image; its bytes are made by :func:`.mime.part_bytes`."""

    filename: str
    content_type: str  # the full header value, parameters included
    kind: str  # invoice | pdf | notes* | csv | png | bin | blob | text
    seed: str
    lines: list[str] = field(default_factory=list)  # pdf: its lines; invoice: subject, number
    size: int = 0  # bin: how many pseudo-random bytes
    data: bytes | None = None  # blob / text: exact bytes
    content_id: str | None = None  # inline image (multipart/related)
    name_style: str = "plain"  # plain | rfc2231 | rfc2047


@dataclass
class MessageSpec:
    id: str
    thread_id: str
    internal_ms: int
    history_id: int
    labels: list[str]
    sender: Person
    to: list[Person]
    cc: list[Person]
    subject: str
    text: str
    html: str | None
    charset: str  # utf-8 | iso-8859-1 | windows-1252
    layout: str  # plain | html | alternative (attachments / inline images wrap it)
    msgid: str
    in_reply_to: str | None = None
    references: str | None = None
    attachments: list[PartSpec] = field(default_factory=list)
    inline: list[PartSpec] = field(default_factory=list)
    hostile: int | None = None
    lying_charset: bool = False  # text declared UTF-8, bytes really Latin-1
    version: int = 0  # bumped when the message changes (labels do not touch the MIME)


@dataclass
class ThreadSpec:
    id: str
    messages: list[MessageSpec]  # oldest first

    @property
    def latest_ms(self) -> int:
        return max(m.internal_ms for m in self.messages)

    @property
    def history_id(self) -> int:
        return max(m.history_id for m in self.messages)


def base_message_id(seed: int, user_idx: int, i: int, j: int) -> str:
    return f"{_prefix(seed, user_idx, i)}{i:05x}{j:02x}"


@lru_cache(maxsize=65_536)
def _prefix(seed: int, user_idx: int, i: int) -> str:
    return stable_hex(seed, user_idx, i, n=9)


def parse_base_id(mid: str) -> tuple[int, int] | None:
    """(thread index, message index) encoded in a generated id, or None."""
    if len(mid) != 16:
        return None
    try:
        return int(mid[9:14], 16), int(mid[14:], 16)
    except ValueError:
        return None


def generated_history_id(anchor: int, ts: int, j: int) -> int:
    return 1_000_000 + (ts - (anchor - EPOCH_BASE_DAYS * DAY)) // 8 + j


def received_labels(rng: random.Random) -> list[str]:
    labels = ["INBOX"] if rng.random() < 0.85 else []
    roll, acc = rng.random(), 0.0
    for cat, share in CATEGORIES:
        acc += share
        if roll < acc:
            labels.append(cat)
            break
    if rng.random() < 0.25:
        labels.append("IMPORTANT")
    if rng.random() < 0.3:
        labels.append("UNREAD")
    if rng.random() < 0.05:
        labels.append("STARRED")
    if rng.random() < 0.10 or not labels or labels[0] != "INBOX":
        labels.append(rng.choice(USER_LABELS)[0])
    return labels


def make_attachment(rng: random.Random, seed: str, subject: str) -> PartSpec:
    """An attachment's name and type; its bytes come later from ``seed``
    (:func:`.mime.part_bytes`), so listing a mailbox never builds them."""
    roll = rng.random()
    aux = random.Random(f"{seed}:params")  # names and parameters; leaves ``rng`` untouched
    if roll < 0.40:
        number = aux.randint(1000, 99999)
        if aux.random() < 0.3:
            return PartSpec(aux.choice(NON_ASCII_FILES[:2]), "application/pdf", "invoice",
                            seed, lines=[subject, str(number)],
                            name_style=aux.choice(["rfc2231", "rfc2047"]))
        return PartSpec(f"invoice-{number}.pdf", "application/pdf", "invoice", seed,
                        lines=[subject, str(number)])
    if roll < 0.58:
        variant = aux.random()
        if variant < 0.35:  # declared Latin-1 and really Latin-1
            return PartSpec("notes.txt", 'text/plain; charset="ISO-8859-1"', "notes-latin1",
                            seed)
        if variant < 0.5:
            return PartSpec(NON_ASCII_FILES[2], 'text/plain; charset="UTF-8"', "notes-utf8",
                            seed, name_style="rfc2231")
        return PartSpec("notes.txt", 'text/plain; charset="US-ASCII"', "notes", seed)
    if roll < 0.70:
        return PartSpec("expenses.csv", "text/csv", "csv", seed)
    if roll < 0.85:
        return PartSpec("image.png", "image/png", "png", seed)
    return PartSpec(aux.choice(["archive.bin", "data.dat"]), "application/octet-stream", "bin",
                    seed, size=aux.randint(100_000, 1_200_000))


def body_text(rng: random.Random, greeting: str, signoff: str) -> tuple[str, str]:
    """(text, charset) of a body: mostly UTF-8, some ISO-8859-1, some Windows-1252."""
    sentences = rng.sample(SENTENCES, rng.randint(1, 4))
    roll = rng.random()
    if roll < 0.7:
        charset = "utf-8"
        if rng.random() < 0.3:
            sentences.append("Caf\u00e9 at 10 \u2014 see you \U0001f44b")
    elif roll < 0.9:
        charset = "iso-8859-1"
        sentences.append(" ".join(rng.sample(LATIN1_WORDS, 2)) + ".")
    else:
        charset = "windows-1252"
        sentences.append(" ".join(rng.sample(CP1252_BITS, 2)))
    return f"Hi {greeting},\n\n{' '.join(sentences)}\n\nBest,\n{signoff}\n", charset


def html_of(text: str, images: list[PartSpec]) -> str:
    paras = "".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>"
                    for p in text.strip().split("\n\n"))
    imgs = "".join(f'<img src="cid:{p.content_id}" alt="{html.escape(p.filename)}">'
                   for p in images)
    return f'<div dir="ltr">{paras}{imgs}</div>'


def build_thread(seed: int, user_idx: int, me: Person, i: int, latest_ts: int, anchor: int,
                 hostile_ordinal: int | None = None) -> ThreadSpec:
    """Thread ``i`` of a user, its newest message dated ``latest_ts`` (seconds)."""
    rng = random.Random(f"{seed}:{user_idx}:gmail:{i}")
    others: list[Person] = []
    for _ in range(rng.randint(1, 4)):
        p = person(rng)
        name = rng.choice(UNICODE_NAMES) if rng.random() < 0.15 else p["name"]
        others.append((name, p["email"]))
    count = message_count(rng)
    topic = rng.choice(TOPICS)
    if rng.random() < 0.15:
        topic += " \u2013 " + rng.choice(LATIN1_WORDS)
    subject = f"{topic} #{rng.randint(1, 999)}"
    dates = [latest_ts]
    for _ in range(count - 1):
        dates.append(dates[-1] - rng.randint(300, 3 * DAY))
    dates.reverse()
    fate = rng.random()  # a few whole threads sit in SPAM or TRASH
    tid = base_message_id(seed, user_idx, i, 0)
    messages: list[MessageSpec] = []
    for j, ts in enumerate(dates):
        outgoing = j != count - 1 and j % 2 == 1
        sender = me if outgoing else others[j % len(others)]
        recipients = [p for p in [me, *others] if p is not sender]
        mid = base_message_id(seed, user_idx, i, j)
        text, charset = body_text(rng, recipients[0][0].split()[0], sender[0])
        atts = ([make_attachment(rng, f"{seed}:{user_idx}:{mid}:a{k}", subject)
                 for k in range(rng.choice([1, 1, 2]))] if rng.random() < 0.12 else [])
        inline: list[PartSpec] = []
        if rng.random() < 0.06:
            inline = [PartSpec("logo.png", "image/png", "png", f"{seed}:{mid}:logo",
                               content_id=f"ii_{mid}_logo")]
        roll = rng.random()
        layout = "plain" if roll < 0.25 else ("html" if roll < 0.35 else "alternative")
        if inline:
            layout = "alternative"
        labels = ["SENT"] if outgoing else received_labels(rng)
        if fate < 0.02:
            labels = ["SPAM"] + [lb for lb in labels if lb in ("UNREAD",)]
        elif fate < 0.04:
            labels = ["TRASH"] + [lb for lb in labels if lb not in ("INBOX", "SENT")]
        ms = ts * 1000 + rng.randrange(1000)
        messages.append(MessageSpec(
            id=mid, thread_id=tid, internal_ms=ms,
            history_id=generated_history_id(anchor, ts, j), labels=labels, sender=sender,
            to=recipients[:1], cc=recipients[1:], subject=subject if j == 0 else f"Re: {subject}",
            text=text, html=None if layout == "plain" else html_of(text, inline),
            charset=charset, layout=layout, msgid=f"<{mid}.{j}@sandbox.gmail>",
            in_reply_to=f"<{base_message_id(seed, user_idx, i, j - 1)}.{j - 1}@sandbox.gmail>"
            if j else None,
            references=f"<{tid}.0@sandbox.gmail>" if j else None,
            attachments=atts, inline=inline))
    thread = ThreadSpec(tid, messages)
    if hostile_ordinal is not None:
        hostilize(thread, hostile_ordinal)
    return thread


# ---------------------------------------------------------------------- hostile mail
def hostile_kinds(ordinal: int) -> list[str]:
    """What the ``ordinal``-th hostile thread of a user carries (see :func:`hostilize`)."""
    kinds = ["nul", "control_chars", "rtl_override", "nul_filename", "broken_charset",
             "raw_8bit_header"]
    if ordinal % 3 == 0:
        kinds.append("lying_body_charset")
    kinds.append(HOSTILE_FILENAME_GROUPS[ordinal % len(HOSTILE_FILENAME_GROUPS)][0])
    if ordinal % HUGE_BODY_EVERY == 0:
        kinds.append("huge_body")
    return kinds


def hostilize(thread: ThreadSpec, ordinal: int) -> list[str]:
    """Rewrite a freshly generated thread in place to carry :func:`hostile_kinds`."""
    for m in thread.messages:
        cut = min(3, len(m.subject))
        m.subject = m.subject[:cut] + NUL + m.subject[cut:] + " " + CONTROL + RTL + "fdp.exe"
        m.sender = (m.sender[0] + NUL + RTL + " (via)", m.sender[1])
        m.text = m.text.replace("\n\n", "\n\n" + NUL + CONTROL + RTL, 1)
        m.hostile = ordinal
        m.charset = "utf-8"  # the RTL override has no Latin-1 byte
        if ordinal % 3 == 0:  # declared UTF-8, written in Latin-1 (RTL becomes "?")
            m.lying_charset = True
            m.text += "Gr\u00fc\u00dfe aus Z\u00fcrich\n"
        if m.html is not None:
            m.html = m.html.replace("<p>", "<p>" + NUL + CONTROL + RTL, 1)
    if ordinal % HUGE_BODY_EVERY == 0:
        first = thread.messages[0]
        first.html, first.layout = huge_unclosed_body(), "alternative"
    latest = thread.messages[-1]
    group = HOSTILE_FILENAME_GROUPS[ordinal % len(HOSTILE_FILENAME_GROUPS)][1]
    extra: list[PartSpec] = []
    for k, name in enumerate(group):
        pdf = name.endswith(".pdf") and not name.startswith("/")
        style = "rfc2231" if (NUL in name or any(ord(c) > 127 for c in name)) else "plain"
        extra.append(PartSpec(name, "application/pdf" if pdf else "application/octet-stream",
                              "pdf" if pdf else "blob", f"{latest.id}:h{k}",
                              lines=[f"hostile attachment {k}"],
                              data=None if pdf else b"hostile attachment payload\n",
                              name_style=style))
    ctype, data = BROKEN_CHARSETS[ordinal % len(BROKEN_CHARSETS)]
    extra.append(PartSpec(f"notes{NUL}{ordinal}.txt", ctype, "text", f"{latest.id}:broken",
                          data=data, name_style="rfc2231"))
    latest.attachments = [*latest.attachments, *extra]
    return hostile_kinds(ordinal)


def user_identity(seed: int, idx: int, used: set[str]) -> Person:
    rng = random.Random(f"{seed}:gmail-user:{idx}")
    who = person(rng)
    email = who["email"] if who["email"] not in used else f"{idx}.{who['email']}"
    return who["name"], email


def new_message_id(seed: int, email: str, n: int) -> str:
    return f"{stable_hex(seed, email, 'new', n, n=10)}{n:06x}"
