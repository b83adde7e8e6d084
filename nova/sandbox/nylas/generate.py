"""Deterministic, lazy generation of sandbox mailboxes.

Everything is derived from ``random.Random`` seeded with strings built from the sandbox seed,
so the same seed (and anchor time) always yields the same grants, threads, messages and
attachment bytes.  Only thread *dates* are computed eagerly (one int per thread); a thread's
messages are generated on first access and kept in a bounded LRU cache, so a 10,000-thread
mailbox starts in milliseconds.

Object shapes follow the Nylas v3 reference:

* Thread fields (``object="thread"``, ``message_ids``, ``latest_draft_or_message``,
  ``earliest_message_date``, ``latest_message_received_date`` ...):
  https://developer.nylas.com/docs/reference/api/threads/ and the SDK model
  ``nylas.models.threads.Thread``.
* Message fields (``from``/``to``/``cc``/``bcc``/``reply_to`` as ``{name, email}``, unix
  ``date``, ``folders``, ``attachments``, ``headers`` with ``fields=include_headers``):
  https://developer.nylas.com/docs/reference/api/messages/ and ``nylas.models.messages``.
* Attachment metadata (``id, grant_id, filename, content_type, size, is_inline,
  content_id``): https://developer.nylas.com/docs/reference/api/attachments/ and
  ``nylas.models.attachments.Attachment``.  Content types may carry MIME parameters, as
  providers pass them through (``image/png; name="image.png"``, ``text/plain;
  charset="ISO-8859-1"``); a text attachment labelled ISO-8859-1 really is Latin-1 bytes.
  Those choices come from a second RNG keyed on the attachment id, so the main stream (and so
  every other generated value) is the same as before they existed.

Hostile mail (``hostile`` share, :func:`hostilize`): a chosen share of threads carries NUL
(``\u0000``) in subjects, snippets, bodies, participant names, header values and attachment
filenames; lone surrogates (``\ud800`` / ``\udc00``) in every other such thread; control
characters and the RTL override (``\u202e``); attachment filenames built to escape a folder
or trip a filesystem (``../../etc/passwd``, ``..\\..\\boot.ini``, ``/abs/path.pdf``,
``CON``, ``NUL.txt``, ``.hidden``, a 300+ byte UTF-8 name, the same name in NFC and NFD, an
empty name, a name of only dots); text attachments whose declared charset lies or is unknown;
and, in every fourth such thread, a 300 KB body of unclosed ``<div>`` tags.  Which kinds a
thread carries depends only on its hostile ordinal (:func:`hostile_kinds`), so tests can list
them without generating anything.
"""

from __future__ import annotations

import hashlib
import html
import random
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .blobs import make_pdf, make_png

DAY = 86_400
YEAR = 365 * DAY

FIRST = ["Ada", "Ben", "Chloe", "Dmitri", "Elena", "Farah", "Gus", "Hana", "Ivan", "Jules",
         "Kofi", "Lena", "Marco", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
         "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe"]
LAST = ["Adams", "Barros", "Chen", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito",
        "Jensen", "Kowalski", "Lopez", "Moreau", "Novak", "Okafor", "Patel", "Rossi", "Silva",
        "Tanaka", "Ueda", "Varga", "Weber", "Yilmaz", "Zhang"]
DOMAINS = ["acme.io", "globex.com", "initech.net", "umbrella.org", "hooli.dev", "stark.co",
           "wayne.biz", "tyrell.ai", "example.org", "contoso.com"]
TOPICS = ["Q3 budget review", "Invoice", "Onboarding plan", "Release 2.4 checklist",
          "Lunch on Friday?", "Contract renewal", "Design feedback", "Travel itinerary",
          "Board deck draft", "Security audit findings", "Hiring pipeline", "Customer escalation",
          "Weekly metrics", "Offsite logistics", "API migration", "Pricing proposal"]
SENTENCES = [
    "Thanks for the quick turnaround on this.", "I have attached the latest version.",
    "Can we move the call to Thursday afternoon?", "The numbers look good overall.",
    "Let me know if anything is unclear.", "We still need sign-off from legal.",
    "I will follow up with the team tomorrow.", "Please review before end of week.",
    "Here is a summary of what we discussed.", "The deadline is tight but doable.",
    "Could you share the source files?", "Looping in a colleague who owns this area.",
]
RECEIVED_FOLDERS = [["INBOX"], ["INBOX", "IMPORTANT"], ["INBOX", "CATEGORY_UPDATES"],
                    ["INBOX", "CATEGORY_PERSONAL"], ["Label_Projects"]]
GRANT_PROVIDERS = ["google", "microsoft", "google", "imap", "google"]
LATIN1_WORDS = ["Grüße", "café", "Ñandú", "façade", "Øresund", "señor", "crème brûlée",
                "Åsa", "naïve", "Zürich"]


def stable_hex(*parts: object, n: int = 10) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:n]


def person(rng: random.Random) -> dict[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return {"name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}@{rng.choice(DOMAINS)}"}


@dataclass
class AttachmentRec:
    id: str
    filename: str
    content_type: str
    size: int
    kind: str  # pdf | text | png | bin | blob
    text: list[str] = field(default_factory=list)
    data: bytes | None = None  # small payloads kept; "bin" is generated on demand
    is_inline: bool = False
    content_id: str | None = None

    def to_json(self, grant_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "grant_id": grant_id, "filename": self.filename,
            "content_type": self.content_type, "size": self.size, "is_inline": self.is_inline,
            "content_disposition": "inline" if self.is_inline else "attachment",
        }
        if self.content_id:
            out["content_id"] = self.content_id
        return out


@dataclass
class MessageRec:
    id: str
    thread_id: str
    subject: str
    from_: list[dict[str, str]]
    to: list[dict[str, str]]
    cc: list[dict[str, str]]
    date: int
    body: str
    snippet: str
    folders: list[str]
    unread: bool
    starred: bool
    attachments: list[AttachmentRec]
    headers: list[dict[str, str]]
    reply_to: list[dict[str, str]] = field(default_factory=list)
    bcc: list[dict[str, str]] = field(default_factory=list)

    def to_json(self, grant_id: str, *, include_headers: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "grant_id": grant_id, "id": self.id, "object": "message",
            "thread_id": self.thread_id, "subject": self.subject, "from": self.from_,
            "to": self.to, "cc": self.cc, "bcc": self.bcc, "reply_to": self.reply_to,
            "date": self.date, "created_at": self.date, "snippet": self.snippet,
            "body": self.body, "folders": list(self.folders), "unread": self.unread,
            "starred": self.starred,
            "attachments": [a.to_json(grant_id) for a in self.attachments],
        }
        if include_headers:
            out["headers"] = self.headers
        return out


@dataclass
class ThreadRec:
    id: str
    messages: list[MessageRec]  # oldest first

    @property
    def latest_ts(self) -> int:
        return max(m.date for m in self.messages)

    def to_json(self, grant_id: str, *, latest_body: bool = True) -> dict[str, Any]:
        """``latest_body=False`` leaves the body out of ``latest_draft_or_message`` (the
        harsher reading: the docs type it as a whole Message, but do not promise its body)."""
        msgs = sorted(self.messages, key=lambda m: (m.date, m.id))
        latest = msgs[-1]
        received = [m.date for m in msgs if "SENT" not in m.folders]
        sent = [m.date for m in msgs if "SENT" in m.folders]
        seen: dict[str, dict[str, str]] = {}
        folders: list[str] = []
        for m in msgs:
            for p in [*m.from_, *m.to, *m.cc]:
                seen.setdefault(p["email"], p)
            folders.extend(f for f in m.folders if f not in folders)
        return {
            "grant_id": grant_id, "id": self.id, "object": "thread",
            "subject": msgs[0].subject, "snippet": latest.snippet,
            "participants": list(seen.values()), "message_ids": [m.id for m in msgs],
            "draft_ids": [], "has_drafts": False, "folders": folders,
            "has_attachments": any(m.attachments for m in msgs),
            "unread": any(m.unread for m in msgs), "starred": any(m.starred for m in msgs),
            "earliest_message_date": msgs[0].date,
            "latest_message_received_date": max(received) if received else None,
            "latest_message_sent_date": max(sent) if sent else None,
            "latest_draft_or_message": {
                k: v for k, v in latest.to_json(grant_id).items()
                if latest_body or k != "body"},
        }


def html_body(greeting: str, sentences: list[str], signoff: str) -> tuple[str, str]:
    text = " ".join(sentences)
    body = (f"<div><p>Hi {html.escape(greeting)},</p><p>{html.escape(text)}</p>"
            f"<p>Best,<br>{html.escape(signoff)}</p></div>")
    snippet = f"Hi {greeting}, {text}"[:100]
    return body, snippet


def message_count(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.45:
        return 1
    if roll < 0.70:
        return 2
    if roll < 0.85:
        return 3
    return min(20, 4 + int(rng.expovariate(1 / 3.0)))


def make_attachment(rng: random.Random, aid: str, subject: str, company: str) -> AttachmentRec:
    roll = rng.random()
    if roll < 0.45:
        number = rng.randint(1000, 99999)
        amount = f"{rng.randint(100, 50000)}.{rng.randint(0, 99):02d}"
        lines = [f"INVOICE {number}", f"Billed to: {company}", f"Re: {subject}",
                 f"Total due: {amount} USD", "Payment terms: net 30 days."]
        lines += [f"Item {i + 1}: {rng.choice(SENTENCES)}" for i in range(rng.randint(1, 60))]
        data = make_pdf(lines)
        return AttachmentRec(aid, f"invoice-{number}.pdf", "application/pdf", len(data), "pdf",
                             text=lines, data=data)
    aux = random.Random(f"{aid}:params")  # MIME parameters; leaves ``rng`` untouched
    if roll < 0.60:
        text = "\n".join(rng.choice(SENTENCES) for _ in range(rng.randint(3, 40)))
        if aux.random() < 0.35:
            # Declared Latin-1 and really Latin-1: UTF-8 decoding of these bytes fails.
            text += "\n" + " ".join(aux.sample(LATIN1_WORDS, 3))
            data = text.encode("latin-1")
            return AttachmentRec(aid, "notes.txt", 'text/plain; charset="ISO-8859-1"',
                                 len(data), "text", data=data)
        data = text.encode()
        return AttachmentRec(aid, "notes.txt", "text/plain", len(data), "text", data=data)
    if roll < 0.72:
        rows = ["date,amount,category"] + [
            f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},{rng.randint(1, 999)},"
            f"{rng.choice(['travel', 'software', 'meals'])}" for _ in range(rng.randint(5, 200))
        ]
        data = "\n".join(rows).encode()
        ctype = 'text/csv; charset="us-ascii"' if aux.random() < 0.35 else "text/csv"
        return AttachmentRec(aid, "expenses.csv", ctype, len(data), "text", data=data)
    if roll < 0.85:
        data = make_png(rng.randint(4, 64), rng.randint(4, 64),
                        (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        inline = rng.random() < 0.5
        ctype = 'image/png; name="image.png"' if aux.random() < 0.35 else "image/png"
        return AttachmentRec(aid, "image.png", ctype, len(data), "png", data=data,
                             is_inline=inline, content_id=f"img-{aid}@sandbox" if inline else None)
    size = rng.randint(150_000, 1_500_000)
    return AttachmentRec(aid, "archive.bin", "application/octet-stream", size, "bin")


def build_thread(seed: int, grant_idx: int, grant_email: str, grant_name: str, thread_id: str,
                 latest_ts: int, hostile_ordinal: int | None = None) -> ThreadRec:
    """Generate one thread whose newest message is dated ``latest_ts`` (a received message).

    With ``hostile_ordinal`` (the thread's rank among the grant's hostile threads) the thread
    is then made hostile by :func:`hostilize`.
    """
    rng = random.Random(f"{seed}:{grant_idx}:{thread_id}")
    me = {"name": grant_name, "email": grant_email}
    others = [person(rng) for _ in range(rng.randint(1, 4))]
    count = message_count(rng)
    subject = f"{rng.choice(TOPICS)} #{rng.randint(1, 999)}"
    dates = [latest_ts]
    for _ in range(count - 1):
        dates.append(dates[-1] - rng.randint(300, 3 * DAY))
    dates.reverse()
    messages: list[MessageRec] = []
    first_msgid = f"<{thread_id}.0@sandbox.nylas>"
    for j, date in enumerate(dates):
        outgoing = j != count - 1 and j % 2 == 1
        sender = me if outgoing else others[j % len(others)]
        recipients = [p for p in [me, *others] if p is not sender]
        to, cc = recipients[:1], recipients[1:]
        mid = f"{thread_id}{j:02x}"
        body, snippet = html_body(to[0]["name"].split()[0],
                                  rng.sample(SENTENCES, rng.randint(1, 4)), sender["name"])
        atts = [make_attachment(rng, f"{mid}a{k}", subject, sender["email"].split("@")[1])
                for k in range(rng.choice([1, 1, 2])) ] if rng.random() < 0.12 else []
        subj = subject if j == 0 else f"Re: {subject}"
        msgid = f"<{thread_id}.{j}@sandbox.nylas>"
        headers = [{"name": "Message-ID", "value": msgid}, {"name": "Subject", "value": subj},
                   {"name": "From", "value": f"{sender['name']} <{sender['email']}>"},
                   {"name": "To", "value": ", ".join(p["email"] for p in to)}]
        if j:
            headers += [{"name": "In-Reply-To", "value": f"<{thread_id}.{j - 1}@sandbox.nylas>"},
                        {"name": "References", "value": first_msgid}]
        messages.append(MessageRec(
            id=mid, thread_id=thread_id, subject=subj, from_=[sender], to=to, cc=cc, date=date,
            body=body, snippet=snippet,
            folders=["SENT"] if outgoing else list(rng.choice(RECEIVED_FOLDERS)),
            unread=(not outgoing) and rng.random() < 0.3, starred=rng.random() < 0.05,
            attachments=atts, headers=headers,
        ))
    thread = ThreadRec(id=thread_id, messages=messages)
    if hostile_ordinal is not None:
        hostilize(thread, hostile_ordinal)
    return thread


def thread_dates(seed: int, grant_idx: int, n: int, anchor: int) -> list[int]:
    """Distinct unix timestamps spread over the year before ``anchor``, newest first."""
    rng = random.Random(f"{seed}:{grant_idx}:dates")
    return [anchor - off for off in sorted(rng.sample(range(60, YEAR), n))]


# ---------------------------------------------------------------------- hostile mail
NUL = "\u0000"
CONTROL = "\x07\x1b[31m\x08\x7f"
RTL = "\u202e"
LONE_HIGH, LONE_LOW = "\ud800", "\udc00"
LONG_NAME = "\u00fc" * 160 + ".pdf"  # 324 bytes of UTF-8, over every filesystem's 255
NFC_NAME = unicodedata.normalize("NFC", "r\u00e9sum\u00e9.pdf")
NFD_NAME = unicodedata.normalize("NFD", NFC_NAME)
HOSTILE_FILENAME_GROUPS: list[tuple[str, list[str]]] = [
    ("path_traversal", ["../../etc/passwd", "..\\..\\boot.ini", "/abs/path.pdf"]),
    ("reserved_names", ["CON", "NUL.txt", ".hidden"]),
    ("unicode_names", [LONG_NAME, NFC_NAME, NFD_NAME]),
    ("degenerate_names", ["", "...", "invoice" + NUL + ".pdf.exe"]),
]
BROKEN_CHARSETS: list[tuple[str, bytes]] = [
    # declared UTF-8, but not UTF-8 at all
    ('text/plain; charset="utf-8"', b"caf\xe9 au lait \xff\xfe then \xc3\x28 broken\n"),
    # a charset no codec knows
    ('text/plain; charset="x-sandbox-nonexistent"', b"price: 12\xa4 \x80\x81\x82\n"),
    # UTF-16 without a BOM and with an odd number of bytes
    ('text/plain; charset="utf-16"', "half a character".encode("utf-16-le") + b"\x00"),
]
HUGE_BODY_EVERY = 4


@lru_cache(maxsize=1)
def huge_unclosed_body() -> str:
    """About 300 KB of ``<div>`` tags that are never closed (one shared string)."""
    return "<div>" * 61_440 + "the end of a body no parser should have to hold"


def hostile_kinds(ordinal: int) -> list[str]:
    """What the ``ordinal``-th hostile thread of a grant carries (see :func:`hostilize`)."""
    kinds = ["nul", "control_chars", "rtl_override", "nul_filename", "broken_charset"]
    if ordinal % 2 == 1:
        kinds.append("lone_surrogate")
    kinds.append(HOSTILE_FILENAME_GROUPS[ordinal % len(HOSTILE_FILENAME_GROUPS)][0])
    if ordinal % HUGE_BODY_EVERY == 0:
        kinds.append("huge_body")
    return kinds


def _hostile_text(text: str, ordinal: int) -> str:
    cut = min(3, len(text))
    out = text[:cut] + NUL + text[cut:] + " " + CONTROL + RTL + "fdp.exe"
    if ordinal % 2 == 1:
        out += " " + LONE_HIGH
    return out


def _hostile_person(p: dict[str, str], ordinal: int) -> dict[str, str]:
    name = p["name"] + NUL + RTL + " (via)"
    if ordinal % 2 == 1:
        name = LONE_LOW + name
    return {"name": name, "email": p["email"]}


def hostilize(thread: ThreadRec, ordinal: int) -> list[str]:
    """Rewrite a freshly generated thread in place to carry :func:`hostile_kinds` (ordinal)."""
    people: dict[str, dict[str, str]] = {}

    def evil(p: dict[str, str]) -> dict[str, str]:
        return people.setdefault(p["email"], _hostile_person(p, ordinal))

    for m in thread.messages:
        m.subject = _hostile_text(m.subject, ordinal)
        m.snippet = NUL + CONTROL + m.snippet
        m.body = m.body.replace("<p>", "<p>" + NUL + CONTROL + RTL, 1)
        m.from_ = [evil(p) for p in m.from_]
        m.to = [evil(p) for p in m.to]
        m.cc = [evil(p) for p in m.cc]
        sender = m.from_[0]
        headers = []
        for h in m.headers:
            if h["name"] == "Subject":
                h = {"name": "Subject", "value": m.subject}
            elif h["name"] == "From":
                h = {"name": "From", "value": f'"{sender["name"]}" <{sender["email"]}>'}
            headers.append(h)
        headers.append({"name": "X-Sandbox-Hostile",
                        "value": "a" + NUL + "b" + CONTROL + RTL
                        + (LONE_HIGH if ordinal % 2 == 1 else "")})
        m.headers = headers
    if ordinal % HUGE_BODY_EVERY == 0:
        first = thread.messages[0]
        first.body = huge_unclosed_body()
    latest = thread.messages[-1]
    group = HOSTILE_FILENAME_GROUPS[ordinal % len(HOSTILE_FILENAME_GROUPS)][1]
    extra: list[AttachmentRec] = []
    for k, name in enumerate(group):
        pdf = name.endswith(".pdf") and not name.startswith("/")
        data = make_pdf([f"hostile attachment {k}"]) if pdf else b"hostile attachment payload\n"
        extra.append(AttachmentRec(f"{latest.id}h{k}", name,
                                   "application/pdf" if pdf else "application/octet-stream",
                                   len(data), "blob", data=data))
    ctype, data = BROKEN_CHARSETS[ordinal % len(BROKEN_CHARSETS)]
    extra.append(AttachmentRec(f"{latest.id}h{len(group)}", f"notes{NUL}{ordinal}.txt", ctype,
                               len(data), "text", data=data))
    latest.attachments = [*latest.attachments, *extra]
    return hostile_kinds(ordinal)
