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
  ``nylas.models.attachments.Attachment``.
"""

from __future__ import annotations

import hashlib
import html
import random
from dataclasses import dataclass, field
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

    def to_json(self, grant_id: str) -> dict[str, Any]:
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
            "latest_draft_or_message": latest.to_json(grant_id),
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
    if roll < 0.60:
        data = ("\n".join(rng.choice(SENTENCES) for _ in range(rng.randint(3, 40)))).encode()
        return AttachmentRec(aid, "notes.txt", "text/plain", len(data), "text", data=data)
    if roll < 0.72:
        rows = ["date,amount,category"] + [
            f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},{rng.randint(1, 999)},"
            f"{rng.choice(['travel', 'software', 'meals'])}" for _ in range(rng.randint(5, 200))
        ]
        data = "\n".join(rows).encode()
        return AttachmentRec(aid, "expenses.csv", "text/csv", len(data), "text", data=data)
    if roll < 0.85:
        data = make_png(rng.randint(4, 64), rng.randint(4, 64),
                        (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        inline = rng.random() < 0.5
        return AttachmentRec(aid, "image.png", "image/png", len(data), "png", data=data,
                             is_inline=inline, content_id=f"img-{aid}@sandbox" if inline else None)
    size = rng.randint(150_000, 1_500_000)
    return AttachmentRec(aid, "archive.bin", "application/octet-stream", size, "bin")


def build_thread(seed: int, grant_idx: int, grant_email: str, grant_name: str, thread_id: str,
                 latest_ts: int) -> ThreadRec:
    """Generate one thread whose newest message is dated ``latest_ts`` (a received message)."""
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
    return ThreadRec(id=thread_id, messages=messages)


def thread_dates(seed: int, grant_idx: int, n: int, anchor: int) -> list[int]:
    """Distinct unix timestamps spread over the year before ``anchor``, newest first."""
    rng = random.Random(f"{seed}:{grant_idx}:dates")
    return [anchor - off for off in sorted(rng.sample(range(60, YEAR), n))]
