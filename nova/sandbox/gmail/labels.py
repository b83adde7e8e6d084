"""Labels of the Gmail sandbox, per user: labels.list / get / create / patch / delete.

From https://developers.google.com/workspace/gmail/api/reference/rest/v1/users.labels:

* Label: ``id`` (immutable), ``name``, ``messageListVisibility`` (show | hide),
  ``labelListVisibility`` (labelShow | labelShowIfUnread | labelHide), ``type`` (system |
  user), ``messagesTotal``, ``messagesUnread``, ``threadsTotal``, ``threadsUnread``, ``color``
  ``{textColor, backgroundColor}`` (user labels only).
* labels.list: "each label resource only contains an id, name, messageListVisibility,
  labelListVisibility, and type. The labels.get method can fetch additional label details" --
  the sandbox takes that reading: no colour, no counts in the list.
* labels.create / patch: a name already used by another label is refused (409 "Label name
  exists or conflicts"); system labels cannot be changed or deleted (400). labels.delete
  "immediately and permanently deletes the specified label and removes it from any messages
  and threads that it is applied to" -- the sandbox's messages keep their ids (GUESS: whether
  Gmail writes labelRemoved history records for them is not documented).
* Nested labels are a naming convention: "Clients/Acme" shows under "Clients".

Gmail's history has no record of a label created, renamed or deleted, and a label change alone
is not a mailbox change that pushes: the sandbox pushes nothing for them.

Counts (labels.get) are the mailbox's own when the user has at most COUNT_LIMIT messages
(counting means generating every thread); above that they are left out.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from . import errors as E
from . import generate as gen
from .mailbox import Mailbox

COUNT_LIMIT = 20_000
HIDDEN = ("SENT", "DRAFT", "SPAM", "TRASH", "CHAT")
# Colours of the generated user labels (from Google's palette).
COLOURS = {"Label_1": ("#16a766", "#ffffff"), "Label_3": ("#4a86e8", "#ffffff")}


@dataclass
class LabelRec:
    id: str
    name: str
    system: bool = False
    background_color: str | None = None
    text_color: str | None = None
    message_list: str = "show"
    label_list: str = "labelShow"

    def listed(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "messageListVisibility": self.message_list,
                "labelListVisibility": self.label_list,
                "type": "system" if self.system else "user"}

    def full(self, counts: dict[str, list[int]] | None) -> dict[str, Any]:
        out = self.listed()
        if counts is not None:
            messages, unread, threads, threads_unread = counts.get(self.id, [0, 0, 0, 0])
            out |= {"messagesTotal": messages, "messagesUnread": unread,
                    "threadsTotal": threads, "threadsUnread": threads_unread}
        if self.background_color is not None or self.text_color is not None:
            out["color"] = {"backgroundColor": self.background_color,
                            "textColor": self.text_color}
        return out


class Labels:
    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.lock = threading.Lock()
        self._users: dict[str, dict[str, LabelRec]] = {}
        self._counter = 100

    def _of(self, email: str) -> dict[str, LabelRec]:
        email = self.mailbox.user(email).email
        found = self._users.get(email)
        if found is None:
            found = {}
            for lid in gen.SYSTEM_LABELS:
                hidden = lid in HIDDEN
                found[lid] = LabelRec(lid, lid, True, message_list="hide" if hidden else "show",
                                      label_list="labelHide" if hidden else "labelShow")
            for lid, name in gen.USER_LABELS:
                bg, text = COLOURS.get(lid, (None, None))
                found[lid] = LabelRec(lid, name, background_color=bg, text_color=text)
            self._users[email] = found
        return found

    def listed(self, email: str) -> list[dict[str, Any]]:
        with self.lock:
            return [rec.listed() for rec in self._of(email).values()]

    def get(self, email: str, lid: str) -> dict[str, Any]:
        with self.lock:
            rec = self._of(email).get(lid)
        if rec is None:
            raise E.not_found()
        return rec.full(self.counts(email))

    def create(self, email: str, name: str, *, background_color: str | None = None,
               text_color: str | None = None) -> dict[str, Any]:
        with self.lock:
            labels = self._of(email)
            self._check_name(labels, name, None)
            self._counter += 1
            rec = LabelRec(f"Label_{self._counter}", name, background_color=background_color,
                           text_color=text_color)
            labels[rec.id] = rec
        return rec.full(None)

    def patch(self, email: str, lid: str, *, name: str | None = None,
              background_color: str | None = None, text_color: str | None = None,
              ) -> dict[str, Any]:
        with self.lock:
            labels = self._of(email)
            rec = self._user_label(labels, lid)
            if name is not None:
                self._check_name(labels, name, lid)
                rec.name = name
            if background_color is not None or text_color is not None:
                rec.background_color, rec.text_color = background_color, text_color
        return rec.full(None)

    def delete(self, email: str, lid: str) -> None:
        with self.lock:
            labels = self._of(email)
            self._user_label(labels, lid)
            del labels[lid]

    @staticmethod
    def _user_label(labels: dict[str, LabelRec], lid: str) -> LabelRec:
        rec = labels.get(lid)
        if rec is None:
            raise E.not_found()
        if rec.system:
            raise E.invalid_argument("Invalid update request: a system label cannot change")
        return rec

    @staticmethod
    def _check_name(labels: dict[str, LabelRec], name: str, lid: str | None) -> None:
        if not name or not name.strip():
            raise E.invalid_argument("Invalid label name")
        if any(r.name.lower() == name.lower() and r.id != lid for r in labels.values()):
            raise E.ApiError(409, "conflict", "Label name exists or conflicts",
                             status="ABORTED")

    def counts(self, email: str) -> dict[str, list[int]] | None:
        """[messages, unread, threads, unread threads] per label id; None when too many."""
        mb = self.mailbox
        with mb.lock:
            u = mb.user(email)
            if len(mb._message_keys(u)) > COUNT_LIMIT:
                return None
            out: dict[str, list[int]] = {}
            for _, tid in mb._thread_keys(u):
                thread = mb.thread(u.email, tid)
                seen: dict[str, bool] = {}
                for m in thread.messages if thread is not None else ():
                    unread = "UNREAD" in m.labels
                    for lid in m.labels:
                        row = out.setdefault(lid, [0, 0, 0, 0])
                        row[0] += 1
                        row[1] += int(unread)
                        seen[lid] = seen.get(lid, False) or unread
                for lid, unread in seen.items():
                    out[lid][2] += 1
                    out[lid][3] += int(unread)
            return out
