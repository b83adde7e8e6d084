"""nova.providers.gmail_mime: Gmail API v1 Message resources (format=full) as Nova messages.

Pure functions, no database: resources are built by hand in Gmail's shape
(https://developers.google.com/workspace/gmail/api/reference/rest/v1/users.messages) and by the
Gmail sandbox's own MIME builder (nova.sandbox.gmail.mime), hostile mail included.
"""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nova.providers.clean import text_codec
from nova.providers.gmail_mime import (
    ATTACHMENT_ID_PREFIX,
    MAX_DEPTH,
    decode_body_data,
    find_attachment_part,
    find_part,
    parse_message,
    parse_thread_messages,
)
from nova.providers.models import Message, Participant
from nova.sandbox.gmail.mailbox import Mailbox
from nova.sandbox.gmail.mime import fill, payload, render, snippet

GRANT = "grant-1"
MS = 1_700_000_000_123  # 2023-11-14T22:13:20.123Z


# ----------------------------------------------------------------------------- builders
def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def hdrs(**pairs: str) -> list[dict[str, str]]:
    return [{"name": k.replace("_", "-"), "value": v} for k, v in pairs.items()]


def leaf(part_id: str, mime: str, data: bytes | str | None = None, *, filename: str = "",
         headers: list[dict[str, str]] | None = None, attachment_id: str | None = None,
         size: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if data is not None:
        raw = data.encode() if isinstance(data, str) else data
        body = {"size": len(raw), "data": b64(raw)}
    if attachment_id is not None:
        body = {"size": size or 0, "attachmentId": attachment_id}
    if not body:
        body = {"size": 0}
    return {"partId": part_id, "mimeType": mime, "filename": filename,
            "headers": headers if headers is not None else hdrs(Content_Type=mime),
            "body": body}


def multi(part_id: str, subtype: str, *parts: dict[str, Any],
          headers: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"partId": part_id, "mimeType": f"multipart/{subtype}", "filename": "",
            "headers": headers if headers is not None
            else hdrs(Content_Type=f'multipart/{subtype}; boundary="b"'),
            "body": {"size": 0}, "parts": list(parts)}


def resource(root: dict[str, Any] | None, *, mid: str = "18c0ffee00000001",
             labels: list[str] | None = None, snippet_text: str = "hello",
             internal: str | None = str(MS), top: list[dict[str, str]] | None = None,
             **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": mid, "threadId": "18c0ffee00000000",
                           "labelIds": labels if labels is not None else ["INBOX"],
                           "snippet": snippet_text, "historyId": "987654",
                           "sizeEstimate": 4321, **extra}
    if internal is not None:
        out["internalDate"] = internal
    if root is not None:
        root = dict(root)
        root["headers"] = (top if top is not None else hdrs(
            From="Ann Example <ann@example.com>", To="bob@example.org",
            Subject="Plain subject", Date="Tue, 14 Nov 2023 22:13:20 +0000")) + root["headers"]
        out["payload"] = root
    return out


def text_part(part_id: str, mime: str, raw: bytes, charset: str | None) -> dict[str, Any]:
    ctype = mime if charset is None else f'{mime}; charset="{charset}"'
    return leaf(part_id, mime, raw, headers=hdrs(Content_Type=ctype))


def single(raw: bytes, charset: str | None, mime: str = "text/plain") -> Message:
    return parse_message(resource(text_part("", mime, raw, charset)), GRANT)


def strings(msg: Message) -> list[str]:
    """Every string a message puts in the store."""
    out = [msg.id, msg.grant_id, msg.thread_id, msg.subject, msg.snippet, msg.body, msg.text,
           *msg.folders]
    for p in (*msg.from_, *msg.to, *msg.cc, *msg.bcc, *msg.reply_to):
        out += [p.email, p.name]
    for k, v in msg.headers or ():
        out += [k, v]
    for a in msg.attachments:
        out += [a.id, a.filename, a.content_type, a.content_id]
    return [s for s in out if s is not None]


def storable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


# ----------------------------------------------------------------------------- structure
def nested() -> dict[str, Any]:
    """mixed > [alternative > [plain, related > [html, inline png]], pdf attachment]."""
    html = '<p>Hello <img src="cid:logo@x"></p>'
    return multi(
        "", "mixed",
        multi("0", "alternative",
              text_part("0.0", "text/plain", b"Hello plain", "utf-8"),
              multi("0.1", "related",
                    leaf("0.1.0", "text/html", html,
                         headers=hdrs(Content_Type='text/html; charset="UTF-8"',
                                      Content_ID="<body@x>")),
                    leaf("0.1.1", "image/png", filename="logo.png", attachment_id="ANGjdJ_1",
                         size=78,
                         headers=hdrs(Content_Type='image/png; name="logo.png"',
                                      Content_Disposition='inline; filename="logo.png"',
                                      Content_ID="<logo@x>")))),
        leaf("1", "application/pdf", filename="invoice.pdf", attachment_id="ANGjdJ_2",
             size=5000, headers=hdrs(Content_Type='application/pdf; name="invoice.pdf"',
                                     Content_Disposition='attachment; filename="invoice.pdf"')))


def test_nested_mixed_alternative_related_with_inline_image() -> None:
    msg = parse_message(resource(nested()), GRANT)
    assert msg.id == "18c0ffee00000001" and msg.thread_id == "18c0ffee00000000"
    assert msg.grant_id == GRANT and msg.present is None
    assert msg.body == '<p>Hello <img src="cid:logo@x"></p>'
    assert msg.text == "Hello plain"
    assert msg.subject == "Plain subject"
    assert msg.from_ == (Participant("ann@example.com", "Ann Example"),)
    assert msg.to == (Participant("bob@example.org", None),)
    logo, pdf = msg.attachments
    assert (logo.id, logo.filename, logo.content_type, logo.size) == (
        "0.1.1", "logo.png", "image/png", 78)
    assert logo.is_inline and logo.content_id == "logo@x" and logo.message_id == msg.id
    assert logo.raw == {"partId": "0.1.1", "attachmentId": "ANGjdJ_1", "inline_data": False}
    assert (pdf.id, pdf.filename, pdf.size, pdf.is_inline, pdf.content_id) == (
        "1", "invoice.pdf", 5000, False, None)
    assert pdf.grant_id == GRANT
    # The html body carries a Content-ID too: it stays the body, not a file.
    assert all(a.content_type != "text/html" for a in msg.attachments)
    assert msg.header("subject") == "Plain subject"
    assert msg.headers is not None and msg.headers[0] == ("From", "Ann Example <ann@example.com>")


def test_raw_keeps_resource_fields_but_not_the_payload() -> None:
    msg = parse_message(resource(nested()), GRANT)
    assert msg.raw == {"id": "18c0ffee00000001", "threadId": "18c0ffee00000000",
                       "historyId": "987654", "internalDate": str(MS), "labelIds": ["INBOX"],
                       "sizeEstimate": 4321}


def test_text_only_and_html_only() -> None:
    plain = single(b"just text\n", "us-ascii")
    assert plain.text == "just text\n" and plain.body is None and plain.attachments == ()
    html = single(b"<b>bold</b>", "utf-8", "text/html")
    assert html.body == "<b>bold</b>" and html.text is None


def test_inline_text_parts_in_mixed_are_joined_alternative_takes_the_first() -> None:
    root = multi("", "mixed",
                 multi("0", "alternative",
                       text_part("0.0", "text/plain", b"first", "utf-8"),
                       text_part("0.1", "text/html", b"<p>first</p>", "utf-8"),
                       text_part("0.2", "text/html", b"<p>other rendering</p>", "utf-8")),
                 text_part("1", "text/plain", b"footer", "utf-8"),
                 text_part("2", "text/html", b"<p>footer</p>", "utf-8"))
    msg = parse_message(resource(root), GRANT)
    assert msg.text == "first\nfooter"
    assert msg.body == "<p>first</p>\n<p>footer</p>"
    assert msg.attachments == ()


# ----------------------------------------------------------------------------- charsets
def test_iso_8859_1_and_windows_1252_bodies_decode_as_browsers_do() -> None:
    # 0xE9 é in both; 0x80 € and 0x93/0x94 smart quotes exist only in windows-1252, which is
    # what browsers use for an ISO-8859-1 label (WHATWG Encoding Standard).
    raw = b"Caf\xe9 \x80 10 \x93quoted\x94 it\x92s"
    want = "Caf\u00e9 \u20ac 10 \u201cquoted\u201d it\u2019s"
    assert single(raw, "ISO-8859-1").text == want
    assert single(raw, "latin1").text == want
    assert single(raw, "windows-1252").text == want
    assert single(raw, "us-ascii").text == want
    # bytes windows-1252 leaves undefined become C1 controls, as in browsers, not U+FFFD
    assert single(b"a\x81b", "iso-8859-1").text == "a\x81b"


def test_utf8_and_other_declared_charsets() -> None:
    assert single("Caf\u00e9 \u20ac \U0001f44b".encode(), "UTF-8").text == (
        "Caf\u00e9 \u20ac \U0001f44b")
    # a 7-bit charset that is no ASCII superset
    assert single(b"\x1b$B$3$s$K$A$O\x1b(B", "ISO-2022-JP").text == "\u3053\u3093\u306b\u3061\u306f"
    assert single("\u00e9t\u00e9".encode("utf-16"), "utf-16").text == "\u00e9t\u00e9"


def test_unknown_charset_is_utf8_with_replacement() -> None:
    assert single("caf\u00e9 ".encode() + b"\xff", "x-sandbox-nonexistent").text == (
        "caf\u00e9 \ufffd")
    assert single(b"abc\xe9", "punycode").text == "abc\ufffd"  # a codec, not a charset


def test_charset_naming_a_non_text_codec_or_nothing_is_read_as_utf8() -> None:
    # rot13, hex, base64, zlib are codecs Python knows, but transforms, not text encodings:
    # their decoders raise (TypeError, AssertionError) instead of decoding. The text is kept.
    for charset in ("rot13", "hex", "base64", "zlib", "x-made-up"):
        msg = single("Hello caf\u00e9".encode() + b" \xff", charset)
        assert msg.text == "Hello caf\u00e9 \ufffd", charset
    html_ = single(b"<p>Hello</p>", "rot13", "text/html")
    assert html_.body == "<p>Hello</p>"


def test_text_codec_only_names_text_encodings() -> None:
    assert text_codec("UTF-8") == "utf-8" and text_codec(' "latin1" ') == "iso8859-1"
    for name in ("rot13", "rot_13", "hex", "base64", "zlib", "bz2", "uu", "quopri",
                 "x-made-up", "punycode", "unicode_escape", "", " ", "a\x00b", None):
        assert text_codec(name) is None, name


def test_missing_charset_tries_utf8_then_windows_1252() -> None:
    assert single("r\u00e9sum\u00e9".encode(), None).text == "r\u00e9sum\u00e9"
    assert single(b"r\xe9sum\xe9 \x80", None).text == "r\u00e9sum\u00e9 \u20ac"


def test_lying_utf8_label_and_damaged_utf8() -> None:
    # declared UTF-8, written in Latin-1 (no valid multi-byte sequence at all): windows-1252
    assert single("Gr\u00fc\u00dfe".encode("latin-1"), "utf-8").text == "Gr\u00fc\u00dfe"
    # real UTF-8 with one broken byte: UTF-8 with a replacement character
    assert single("Gr\u00fc\u00dfe ".encode() + b"\xff", "utf-8").text == "Gr\u00fc\u00dfe \ufffd"


def test_quoted_printable_header_does_not_decode_twice() -> None:
    # Gmail's body.data is already the decoded content: "=3D" here is literal text.
    part = leaf("", "text/plain", b"a=3Db =\r\nc",
                headers=hdrs(Content_Type="text/plain; charset=utf-8",
                             Content_Transfer_Encoding="quoted-printable"))
    assert parse_message(resource(part), GRANT).text == "a=3Db =\r\nc"


# ----------------------------------------------------------------------------- headers
def test_rfc2047_subject_and_names() -> None:
    top = hdrs(
        Subject="=?UTF-8?B?UHLDpHNlbnRhdGlvbiDinJM=?= =?ISO-8859-1?Q?_f=FCr_Andr=E9?=",
        From="=?utf-8?q?Jos=C3=A9_N=C3=BA=C3=B1ez?= <jose@example.com>",
        To='"=?iso-8859-1?q?Fran=E7oise?=" <f@example.fr>, '
           "=?utf-8?q?Doe=2C_John?= <john@example.com>",
        Cc="=?utf-8?b?w6k=?==?utf-8?b?w6k=?= <e@example.com>",
        Reply_To="=?x-unknown?q?abc?= <r@example.com>")
    msg = parse_message(resource(leaf("", "text/plain", "x"), top=top), GRANT)
    assert msg.subject == "Pr\u00e4sentation \u2713 f\u00fcr Andr\u00e9"
    assert msg.from_ == (Participant("jose@example.com", "Jos\u00e9 N\u00fa\u00f1ez"),)
    # an encoded comma stays inside the name: addresses are split before decoding
    assert msg.to == (Participant("f@example.fr", "Fran\u00e7oise"),
                      Participant("john@example.com", "Doe, John"))
    assert msg.cc == (Participant("e@example.com", "\u00e9\u00e9"),)
    # a word in a charset nobody knows: the stdlib reads it as ASCII (other bytes: U+FFFD)
    assert msg.reply_to == (Participant("r@example.com", "abc"),)
    assert msg.header("From") == "Jos\u00e9 N\u00fa\u00f1ez <jose@example.com>"


def test_rfc2047_in_two_charsets_a_q_encoded_name_and_lying_charsets() -> None:
    top = hdrs(
        Subject="=?ISO-8859-1?Q?Gr=FC=DFe?= =?UTF-8?B?w6Agdm91cw==?= und =?koi8-r?b?8NLJ18XU?=",
        From="=?iso-8859-1?q?Ren=E9e_M=FCller?= <renee@example.de>",
        To="=?rot13?q?Uryyb?= <r@example.com>, =?hex?b?SGk=?= <h@example.com>",
        X_Odd="=?x-made-up?q?plain?= text")
    msg = parse_message(resource(leaf("", "text/plain", "x"), top=top), GRANT)
    # adjacent words in different charsets: the space between them goes, as RFC 2047 says
    assert msg.subject == "Gr\u00fc\u00dfe\u00e0 vous und \u041f\u0440\u0438\u0432\u0435\u0442"
    assert msg.from_ == (Participant("renee@example.de", "Ren\u00e9e M\u00fcller"),)
    # a transform named as charset decodes as ASCII: readable, never raising
    assert msg.to == (Participant("r@example.com", "Uryyb"), Participant("h@example.com", "Hi"))
    assert msg.header("X-Odd") == "plain text"


def test_nul_and_lone_surrogate_produced_by_decoding_are_cleaned() -> None:
    top = hdrs(Subject="=?utf-8?q?a=00b?= =?utf-8?b?Y/9k?=",  # NUL; a byte that is no UTF-8
               From="=?x-made-up?q?Ev=FFe?= <eve@example.com>")  # unknown charset: \udcff
    root = multi("", "mixed", text_part("0", "text/plain", b"x", "utf-8"),
                 leaf("1", "application/pdf", attachment_id="A", headers=hdrs(
                     Content_Disposition="attachment; filename*=utf-8''a%00b%FF.pdf")))
    msg = parse_message(resource(root, top=top), GRANT)
    assert msg.subject == "abc\ufffdd"
    assert msg.from_ == (Participant("eve@example.com", "Ev\ufffde"),)
    assert msg.attachments[0].filename == "ab\ufffd.pdf"
    assert all(storable(s) for s in strings(msg))


def test_encoded_words_split_inside_a_character_and_broken_ones() -> None:
    euro = "\u20ac".encode()  # three bytes, split over two B words
    word1 = base64.b64encode(b"x" + euro[:1]).decode()
    word2 = base64.b64encode(euro[1:] + b"y").decode()
    top = hdrs(Subject=f"=?utf-8?b?{word1}?=\r\n =?utf-8?b?{word2}?= end",
               X_Broken="=?utf-8?b?!!!?= and =?utf-8?q?=ZZ?= and =?utf-8?b?", Date="garbage")
    msg = parse_message(resource(leaf("", "text/plain", "x"), top=top), GRANT)
    assert msg.subject == "x\u20acy end"
    broken = msg.header("X-Broken")
    assert broken is not None and broken.endswith("=?utf-8?b?") and "and" in broken


def test_address_garbage_never_raises_and_drops_entries_without_address() -> None:
    top = hdrs(From="garbage<<<>>>@@", To="undisclosed-recipients:;",
               Cc="Name Only, <ok@example.com>, ((((", Bcc="a@b.example")
    top.append({"name": "To", "value": "Second To <second@example.com>"})
    top.append({"name": "Cc", "value": None})  # type: ignore[dict-item]
    msg = parse_message(resource(leaf("", "text/plain", "x"), top=top), GRANT)
    assert msg.from_ == ()
    assert msg.to == (Participant("second@example.com", "Second To"),)
    assert msg.cc == (Participant("ok@example.com", None),)
    assert msg.bcc == (Participant("a@b.example", None),)


def test_headers_that_are_not_a_list_or_not_objects() -> None:
    msg = parse_message(resource(None, payload={"mimeType": "text/plain", "headers": "junk",
                                                 "body": {"data": b64("hi")}}), GRANT)
    assert msg.headers is None and msg.subject is None and msg.text == "hi"
    msg = parse_message(resource(None, payload={
        "mimeType": "text/plain", "body": {"data": b64("hi")},
        "headers": [None, "x", {"name": 7, "value": "v"}, {"name": "Subject", "value": 5},
                    {"value": "no name"}]}), GRANT)
    assert msg.headers == (("Subject", "5"),) and msg.subject == "5"


# ----------------------------------------------------------------------------- filenames
def test_rfc2231_and_rfc2047_filenames() -> None:
    root = multi(
        "", "mixed", text_part("0", "text/plain", b"see files", "utf-8"),
        # filename field empty: RFC 2231 from Content-Disposition
        leaf("1", "application/pdf", attachment_id="A1", size=10, headers=hdrs(
            Content_Type="application/pdf",
            Content_Disposition="attachment; filename*=UTF-8''Pr%C3%A4sentation%20Q3.pdf")),
        # RFC 2231 continuations
        leaf("2", "application/pdf", attachment_id="A2", size=10, headers=hdrs(
            Content_Type="application/pdf",
            Content_Disposition="attachment; filename*0*=UTF-8''r%C3%A9sum; "
                                "filename*1*=%C3%A9.pdf")),
        # RFC 2047 inside a quoted Content-Type name, no disposition
        leaf("3", "text/plain", attachment_id="A3", size=10, headers=hdrs(
            Content_Type='text/plain; name="=?utf-8?b?5pel5pys6KqeLnR4dA==?="')),
        # filename field still RFC 2231-encoded, no header to help
        leaf("4", "application/pdf", filename="utf-8''na%C3%AFve.pdf", attachment_id="A4",
             headers=[]),
        # filename field with an encoded word
        leaf("5", "application/pdf", filename="=?ISO-8859-1?Q?caf=E9.pdf?=", attachment_id="A5",
             headers=[]),
        # plain continuations, and a quoted semicolon that is no parameter separator
        leaf("6", "application/pdf", attachment_id="A6", headers=hdrs(
            Content_Disposition='attachment; filename*0="long "; filename*1="na;me.pdf"')),
        # filename field already decoded by Gmail: kept, path separators and all
        leaf("7", "application/octet-stream", filename="../../etc/passwd", attachment_id="A7",
             headers=hdrs(Content_Disposition='attachment; filename="../../etc/passwd"')))
    msg = parse_message(resource(root), GRANT)
    assert [a.filename for a in msg.attachments] == [
        "Pr\u00e4sentation Q3.pdf", "r\u00e9sum\u00e9.pdf", "\u65e5\u672c\u8a9e.txt",
        "na\u00efve.pdf", "caf\u00e9.pdf", "long na;me.pdf", "../../etc/passwd"]
    assert [a.id for a in msg.attachments] == ["1", "2", "3", "4", "5", "6", "7"]
    assert msg.text == "see files"


def test_rfc2231_percent_escapes_continuations_and_lying_charsets() -> None:
    root = multi(
        "", "mixed", text_part("0", "text/plain", b"files", "utf-8"),
        leaf("1", "application/pdf", attachment_id="A1", headers=hdrs(
            Content_Disposition="attachment; filename*0*=utf-8''%E2%82%AC%20Rechnung%20; "
                                "filename*1*=M%C3%A4rz; filename*2=.pdf")),
        leaf("2", "text/plain", attachment_id="A2", headers=hdrs(
            Content_Type="text/plain; name*=iso-8859-1'de'Gr%FC%DFe.txt")),
        leaf("3", "application/pdf", attachment_id="A3", headers=hdrs(
            Content_Disposition="attachment; filename*=rot13''Uryyb%20.pdf")),
        leaf("4", "application/pdf", filename="hex''a%41.pdf", attachment_id="A4",
             headers=[]),
        leaf("5", "application/pdf", filename="Bob's and Al's.pdf", attachment_id="A5",
             headers=[]))
    msg = parse_message(resource(root), GRANT)
    assert [a.filename for a in msg.attachments] == [
        "\u20ac Rechnung M\u00e4rz.pdf", "Gr\u00fc\u00dfe.txt", "Uryyb .pdf",
        "hex''a%41.pdf", "Bob's and Al's.pdf"]


# ----------------------------------------------------------------------------- attachments
def test_attachment_without_filename_but_with_attachment_id() -> None:
    root = multi("", "mixed", text_part("0", "text/plain", b"body", "utf-8"),
                 leaf("1", "application/octet-stream", attachment_id="ANGj_x", size=123,
                      headers=hdrs(Content_Type="application/octet-stream")))
    (att,) = parse_message(resource(root), GRANT).attachments
    assert (att.id, att.filename, att.size, att.is_inline) == ("1", None, 123, False)
    assert att.raw == {"partId": "1", "attachmentId": "ANGj_x", "inline_data": False}


def test_inline_data_attachments() -> None:
    ics = "BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n"
    root = multi("", "mixed", text_part("0", "text/plain", b"invite", "utf-8"),
                 leaf("1", "text/calendar", ics, filename="invite.ics",
                      headers=hdrs(Content_Type='text/calendar; method=REQUEST; name="invite.ics"',
                                   Content_Disposition='inline; filename="invite.ics"')),
                 leaf("2", "image/gif", b"GIF89a", headers=hdrs(Content_Type="image/gif",
                                                                Content_ID=" <pic@x> ")))
    msg = parse_message(resource(root), GRANT)
    cal, gif = msg.attachments
    assert msg.text == "invite"
    assert cal.raw == {"partId": "1", "attachmentId": None, "inline_data": True}
    assert (cal.filename, cal.size, cal.is_inline, cal.content_type) == (
        "invite.ics", len(ics), True, "text/calendar")
    assert (gif.content_id, gif.is_inline, gif.filename) == ("pic@x", True, None)
    assert gif.raw["inline_data"] is True


def test_content_id_with_attachment_disposition_is_not_inline() -> None:
    root = multi("", "mixed", text_part("0", "text/plain", b"x", "utf-8"),
                 leaf("1", "image/png", filename="a.png", attachment_id="Z", headers=hdrs(
                     Content_Disposition='attachment; filename="a.png"', Content_ID="<a@x>")))
    (att,) = parse_message(resource(root), GRANT).attachments
    assert att.content_id == "a@x" and att.is_inline is False


def test_message_rfc822_is_an_attachment_not_walked_for_the_body() -> None:
    inner = multi("1.0", "alternative",
                  text_part("1.0.0", "text/plain", b"forwarded text", "utf-8"),
                  text_part("1.0.1", "text/html", b"<p>forwarded</p>", "utf-8"))
    inner["headers"] = hdrs(Subject="Inner", Content_Type='multipart/alternative; boundary="i"')
    fwd = {"partId": "1", "mimeType": "message/rfc822", "filename": "",
           "headers": hdrs(Content_Type="message/rfc822"), "body": {"size": 2048},
           "parts": [inner]}
    root = multi("", "mixed", text_part("0", "text/plain", b"see below", "utf-8"), fwd,
                 leaf("2", "message/rfc822", filename="old.eml", attachment_id="EML",
                      size=99, headers=hdrs(Content_Type="message/rfc822",
                                            Content_Disposition="attachment")))
    msg = parse_message(resource(root), GRANT)
    assert msg.text == "see below" and msg.body is None
    assert [(a.id, a.content_type, a.filename, a.size) for a in msg.attachments] == [
        ("1", "message/rfc822", None, 2048), ("2", "message/rfc822", "old.eml", 99)]


def test_part_ids_missing_empty_or_repeated_get_walk_index_ids() -> None:
    a = leaf("", "application/pdf", filename="a.pdf", attachment_id="X")
    b = leaf("1", "application/pdf", filename="b.pdf", attachment_id="Y")
    c = leaf("1", "application/pdf", filename="c.pdf", attachment_id="Z")
    del a["partId"]
    root = multi("", "mixed", "not a part", a, b, None, c)  # type: ignore[arg-type]
    msg = parse_message(resource(root), GRANT)
    assert [x.id for x in msg.attachments] == [f"{ATTACHMENT_ID_PREFIX}1", "1",
                                               f"{ATTACHMENT_ID_PREFIX}3"]
    assert [x.raw["partId"] for x in msg.attachments] == [None, "1", "1"]
    # every attachment id leads back to its part, the walk-index ones included
    payload_ = resource(root)["payload"]
    assert [find_attachment_part(payload_, x.id) for x in msg.attachments] == [a, b, c]
    assert find_part(payload_, f"{ATTACHMENT_ID_PREFIX}1") is None
    assert find_attachment_part(payload_, "nope") is None
    assert find_attachment_part(None, "1") is None
    # a message that is one attachment: the root's partId is "", the id is still usable
    only = parse_message(resource(leaf("", "application/pdf", filename="x.pdf",
                                       attachment_id="R")), GRANT)
    assert only.attachments[0].id == f"{ATTACHMENT_ID_PREFIX}0"
    assert only.attachments[0].raw["partId"] == ""


# ----------------------------------------------------------------------------- hostile
def test_nul_and_lone_surrogates_everywhere_are_cleaned() -> None:
    top = hdrs(Subject="Pay\x00ment \ud800 now", From="Ev\x00e \udc00 <eve@example.com>",
               To="bob@exa\x00mple.com", X_Note="a\x00b")
    root = multi("", "mixed",
                 text_part("0", "text/plain", b"body\x00text", "utf-8"),
                 leaf("1", "application/pdf", filename="inv\x00oice\ud800.pdf",
                      attachment_id="Q\x00", headers=hdrs(Content_ID="<c\x00id>")))
    msg = parse_message(resource(root, top=top, snippet_text="snip\x00pet \udfff"), GRANT)
    assert msg.subject == "Payment \ufffd now"
    assert msg.from_ == (Participant("eve@example.com", "Eve \ufffd"),)
    assert msg.to == (Participant("bob@example.com", None),)
    assert msg.text == "bodytext" and msg.snippet == "snippet \ufffd"
    assert msg.attachments[0].filename == "invoice\ufffd.pdf"
    assert msg.attachments[0].content_id == "cid"
    assert msg.header("X-Note") == "ab"
    assert all(storable(s) for s in strings(msg))
    assert all(storable(str(v)) for v in msg.attachments[0].raw.values())


def test_broken_base64_body_costs_only_what_is_broken() -> None:
    good = b64("Hello world")
    part = leaf("", "text/plain", headers=hdrs(Content_Type="text/plain; charset=utf-8"))
    part["body"] = {"size": 11, "data": good[:4] + " \n!*" + good[4:] + "@"}
    assert parse_message(resource(part), GRANT).text == "Hello world"
    part["body"] = {"size": 3, "data": 12345}
    assert parse_message(resource(part), GRANT).text == ""
    part["body"] = "not an object"
    assert parse_message(resource(part), GRANT).text == ""


def test_decode_body_data() -> None:
    raw = bytes(range(256))
    url = base64.urlsafe_b64encode(raw).decode()
    assert decode_body_data(url) == raw
    assert decode_body_data(url.rstrip("=")) == raw
    assert decode_body_data(base64.b64encode(raw).decode()) == raw  # standard alphabet
    folded = "\r\n".join(url[i:i + 76] for i in range(0, len(url), 76))
    assert decode_body_data(folded) == raw
    assert decode_body_data("QQ==QQ==") == b"AA"  # concatenated padded chunks
    assert decode_body_data("SGVsbG8x=") == b"Hello1"  # wrong padding
    assert decode_body_data("SGVsbG8xA") == b"Hello1"  # one stray character
    assert decode_body_data("") == b"" and decode_body_data("!!!!") == b""
    assert decode_body_data(None) == b""  # type: ignore[arg-type]


def test_missing_payload_keeps_the_message() -> None:
    msg = parse_message(resource(None, labels=["UNREAD"]), GRANT)
    assert msg.headers is None and msg.subject is None and msg.from_ == ()
    assert msg.body is None and msg.text is None and msg.attachments == ()
    assert msg.date == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert msg.unread and msg.snippet == "hello"
    bad = parse_message(resource(None, payload=["x"], labelIds="INBOX", snippet=3), GRANT)
    assert bad.folders == () and bad.snippet is None and bad.body is None


def test_deep_nesting_is_capped_without_raising() -> None:
    def deep(levels: int) -> dict[str, Any]:
        node = text_part("x", "text/plain", b"deep", "utf-8")
        for _ in range(levels):
            node = multi("m", "mixed", node)
        return node

    assert parse_message(resource(deep(MAX_DEPTH - 1)), GRANT).text == "deep"
    assert parse_message(resource(deep(MAX_DEPTH + 5)), GRANT).text is None
    assert parse_message(resource(deep(400)), GRANT).text is None
    assert find_part(deep(MAX_DEPTH + 5), "x") is None
    assert find_part(deep(10), "x") is not None


def test_pathological_mime_headers_are_cheap() -> None:
    # An unterminated quote before a million semicolons makes naive parameter parsers
    # quadratic; two hundred such parts must still parse at once.
    semicolons = ";" * 1_000_000
    heads = hdrs(Content_Type='application/octet-stream; name="' + semicolons,
                 Content_Disposition='attachment; filename="' + semicolons)
    parts = [leaf(str(k), "application/octet-stream", attachment_id=f"A{k}", headers=heads)
             for k in range(200)]
    start = time.monotonic()
    msg = parse_message(resource(multi("", "mixed", *parts)), GRANT)
    assert len(msg.attachments) == 200 and msg.attachments[0].is_inline is False
    assert time.monotonic() - start < 5


def test_huge_body_is_linear() -> None:
    text = ("0123456789abcdef" * 4 + "\n") * 170_000  # ~11 MB
    start = time.monotonic()
    msg = single(text.encode(), "utf-8", "text/html")
    assert msg.body == text
    assert time.monotonic() - start < 5


# ----------------------------------------------------------------------------- fields
def test_labels_become_folders_unread_starred() -> None:
    msg = parse_message(resource(leaf("", "text/plain", "x"),
                                 labels=["INBOX", "UNREAD", "STARRED", "Label_4", 7]), GRANT)
    assert msg.folders == ("INBOX", "UNREAD", "STARRED", "Label_4")
    assert msg.unread and msg.starred
    read = parse_message(resource(leaf("", "text/plain", "x"), labels=["SENT"]), GRANT)
    assert not read.unread and not read.starred and read.folders == ("SENT",)


def test_internal_date_wins_over_a_forged_date_header() -> None:
    forged = hdrs(Subject="s", Date="Fri, 01 Jan 2038 00:00:00 +0000")
    msg = parse_message(resource(leaf("", "text/plain", "x"), top=forged), GRANT)
    assert msg.date == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert msg.created_at == msg.date


def test_date_header_fallback() -> None:
    top = hdrs(Date="Tue, 14 Nov 2023 23:13:20 +0100")
    for internal in (None, "not a number", "0"):
        msg = parse_message(resource(leaf("", "text/plain", "x"), top=top, internal=internal),
                            GRANT)
        assert msg.date == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
        assert msg.date is not None and msg.date.utcoffset() is not None
    naive = parse_message(resource(leaf("", "text/plain", "x"), internal=None,
                                   top=hdrs(Date="Tue, 14 Nov 2023 22:13:20 -0000")), GRANT)
    assert naive.date == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    bad = parse_message(resource(leaf("", "text/plain", "x"), internal="x",
                                 top=hdrs(Date="yesterday-ish")), GRANT)
    assert bad.date is None and bad.created_at is None
    numeric = parse_message(resource(leaf("", "text/plain", "x"), internal=MS), GRANT)  # type: ignore[arg-type]
    assert numeric.date == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)


def test_snippet_is_html_unescaped() -> None:
    msg = parse_message(resource(leaf("", "text/plain", "x"),
                                 snippet_text="It&#39;s &quot;ok&quot; &lt;3 &amp; more"), GRANT)
    assert msg.snippet == "It's \"ok\" <3 & more"


# ----------------------------------------------------------------------------- threads, parts
def test_parse_thread_messages_skips_garbage() -> None:
    good = resource(leaf("", "text/plain", "one"), mid="m1")
    no_thread = resource(leaf("", "text/plain", "two"), mid="m2")
    del no_thread["threadId"]
    thread = {"id": "t1", "historyId": "5",
              "messages": [good, None, "junk", {"no": "id"}, {"id": ""}, no_thread,
                           {"id": "m3", "payload": {"parts": "junk", "body": []}}]}
    msgs = parse_thread_messages(thread, GRANT)
    assert [m.id for m in msgs] == ["m1", "m2", "m3"]
    assert [m.thread_id for m in msgs] == ["18c0ffee00000000", "t1", "t1"]
    assert msgs[0].text == "one" and msgs[1].text == "two"
    assert parse_thread_messages({"id": "t", "messages": "junk"}, GRANT) == []
    assert parse_thread_messages(None, GRANT) == []  # type: ignore[arg-type]


def test_find_part() -> None:
    root = nested()
    found = find_part(root, "0.1.1")
    assert found is not None and found["filename"] == "logo.png"
    assert find_part(root, "1") is root["parts"][1]
    assert find_part(root, "") is root
    assert find_part(root, "9") is None
    assert find_part(None, "1") is None
    assert find_part({"partId": "0", "parts": "junk"}, "0.0") is None


# ----------------------------------------------------------------------------- sandbox
def sandbox_resource(mb: Mailbox, email: str, spec: Any) -> dict[str, Any]:
    raw = render(spec, email)
    return {"id": spec.id, "threadId": spec.thread_id, "labelIds": list(spec.labels),
            "snippet": snippet(spec), "historyId": str(spec.history_id),
            "internalDate": str(spec.internal_ms), "sizeEstimate": len(raw),
            "payload": fill(payload(raw), lambda part: f"tok-{part}")}


def written(value: str, lying: bool) -> str:
    """What a sandbox body holds: a lying message is Latin-1 under a UTF-8 label."""
    value = value.replace("\x00", "")
    return value.encode("latin-1", "replace").decode("latin-1") if lying else value


def test_sandbox_mail_including_hostile_parses_as_generated() -> None:
    mb = Mailbox(seed=11, threads=24, users=1, hostile=0.5)
    email = mb.emails[0]
    hostile = mb.hostile_threads(email)
    assert hostile
    seen = lying = with_files = 0
    threads, _, _ = mb.list_threads(email, limit=100, include_spam_trash=True)
    assert len(threads) == 24
    for thread in threads:
        msgs = parse_thread_messages(
            {"id": thread.id, "messages": [sandbox_resource(mb, email, m)
                                           for m in thread.messages]}, GRANT)
        assert [m.id for m in msgs] == [s.id for s in thread.messages]
        for spec, msg in zip(thread.messages, msgs, strict=True):
            seen += 1
            assert all(storable(s) for s in strings(msg))
            assert msg.subject == spec.subject.replace("\x00", "")
            assert msg.from_[0].email == spec.sender[1]
            assert msg.date is not None and int(msg.date.timestamp() * 1000) == spec.internal_ms
            assert msg.folders == tuple(spec.labels)
            lying += spec.lying_charset
            if spec.layout == "html" and spec.html is not None:
                assert msg.text is None
            else:
                text = (msg.text or "").replace("\r\n", "\n")
                assert text == written(spec.text, spec.lying_charset)
            if spec.layout == "plain" or spec.html is None:
                assert msg.body is None
            else:
                body = (msg.body or "").replace("\r\n", "\n")
                assert body == written(spec.html, spec.lying_charset)
            files = [*spec.inline, *spec.attachments]
            with_files += bool(files)
            assert len(msg.attachments) == len(files)
            for part, att in zip(files, msg.attachments, strict=True):
                name = part.filename.replace("\x00", "")
                assert att.filename == (name or None)
                assert att.raw["attachmentId"] == f"tok-{att.raw['partId']}"
                assert att.is_inline == (part.content_id is not None)
                assert att.content_id == part.content_id
    assert seen > 24 and lying and with_files


# ----------------------------------------------------------------------------- fuzz
_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["partId", "mimeType", "filename", "headers", "body", "parts", "data",
                         "attachmentId", "size", "name", "value"]), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(payload_=_junk, labels=_junk, internal=_junk, snippet_=_junk)
def test_junk_never_raises(payload_: Any, labels: Any, internal: Any, snippet_: Any) -> None:
    msg = parse_message({"id": "m", "payload": payload_, "labelIds": labels,
                         "internalDate": internal, "snippet": snippet_}, GRANT)
    assert msg.id == "m"
    assert all(storable(s) for s in strings(msg))
