"""The Gmail API v1 requests Nova sends: each method's HTTP verb, path and query parameters as
Google's discovery document gives them (https://gmail.googleapis.com/$discovery/rest?version=v1).

Nova calls eleven methods of a stable API. Building their requests from this table rather than
with google-api-python-client's discovery client keeps that package (about 115 MB installed,
most of it the discovery documents of every Google API, and google-api-core, protobuf,
httplib2 and requests with it) out of the production install. The tests keep it as the
reference: tests/test_gmail_api.py checks this table against the discovery document the
package bundles and every request against the one its discovery client builds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode


@dataclass(frozen=True)
class Method:
    http_method: str
    path: str  # joined to the API's root URL; {name} is a path parameter
    query: frozenset[str] = frozenset()  # the query parameters Nova may send
    body: bool = False  # takes a JSON request body


_LIST = frozenset({"includeSpamTrash", "labelIds", "maxResults", "pageToken", "q"})
_GET = frozenset({"format", "metadataHeaders"})
METHODS: dict[str, Method] = {
    "getProfile": Method("GET", "gmail/v1/users/{userId}/profile"),
    "watch": Method("POST", "gmail/v1/users/{userId}/watch", body=True),
    "stop": Method("POST", "gmail/v1/users/{userId}/stop"),
    "threads.list": Method("GET", "gmail/v1/users/{userId}/threads", _LIST),
    "threads.get": Method("GET", "gmail/v1/users/{userId}/threads/{id}", _GET),
    "messages.list": Method("GET", "gmail/v1/users/{userId}/messages", _LIST),
    "messages.get": Method("GET", "gmail/v1/users/{userId}/messages/{id}", _GET),
    "messages.attachments.get": Method(
        "GET", "gmail/v1/users/{userId}/messages/{messageId}/attachments/{id}"),
    "labels.list": Method("GET", "gmail/v1/users/{userId}/labels"),
    "labels.get": Method("GET", "gmail/v1/users/{userId}/labels/{id}"),
    "history.list": Method("GET", "gmail/v1/users/{userId}/history", frozenset(
        {"historyTypes", "labelId", "maxResults", "pageToken", "startHistoryId"})),
}
_PATH_PARAMETER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Request:
    """One request to send: its verb, its full URL and its JSON body."""

    method: str
    uri: str
    body: str | None = None


def _query_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def build(api_uri: str, name: str, body: Mapping[str, Any] | None = None,
          **params: Any) -> Request:
    """The request of method ``name``: path parameters percent-encoded whole (an address's
    ``@``, an id's ``/``), the rest in the query (booleans as true/false, a list as the
    parameter repeated, None left out). A parameter the method lacks is a TypeError, as in
    the discovery client."""
    method = METHODS[name]
    missing = [p for p in _PATH_PARAMETER.findall(method.path) if params.get(p) is None]
    if missing:
        raise TypeError(f"{name} needs {', '.join(missing)}")
    path = _PATH_PARAMETER.sub(lambda m: quote(str(params.pop(m.group(1))), safe=""),
                               method.path)
    unknown = set(params) - method.query
    if unknown or (body is not None and not method.body):
        raise TypeError(f"{name} takes no {', '.join(sorted(unknown) or ['body'])}")
    query = [(key, _query_value(item)) for key, value in params.items() if value is not None
             for item in (value if isinstance(value, list | tuple) else [value])]
    uri = f"{api_uri.rstrip('/')}/{path}" + (f"?{urlencode(query)}" if query else "")
    return Request(method.http_method, uri, None if body is None else json.dumps(body))
