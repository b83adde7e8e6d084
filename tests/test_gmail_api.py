"""The Gmail requests Nova builds (nova.providers.gmail_api) are Google's: the table is the
discovery document google-api-python-client bundles, and each request is the one its discovery
client builds for the same call (GmailProvider against the sandbox: tests/test_gmail_sync.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from googleapiclient import discovery
from googleapiclient.discovery_cache import get_static_doc
from googleapiclient.http import HttpMock

from nova.providers import gmail_api

ROOT = "http://127.0.0.1:8765"
USER = "Ann.O'Neil+mail@example.com"


def _document() -> dict[str, Any]:
    return json.loads(get_static_doc("gmail", "v1"))  # type: ignore[no-any-return]


def _described(name: str) -> dict[str, Any]:
    resource = _document()["resources"]["users"]
    *path, method = name.split(".")
    for part in path:
        resource = resource["resources"][part]
    return resource["methods"][method]  # type: ignore[no-any-return]


def _theirs(name: str, body: Any, params: dict[str, Any]) -> Any:
    service = discovery.build("gmail", "v1", http=HttpMock(), static_discovery=True,
                              cache_discovery=False, client_options={"api_endpoint": ROOT})
    target = service.users()
    *path, method = name.split(".")
    for part in path:
        target = getattr(target, part)()
    extra = {} if body is None else {"body": body}
    return getattr(target, method)(**params, **extra)


def test_the_table_is_the_discovery_documents() -> None:
    assert _document()["rootUrl"] == "https://gmail.googleapis.com/"
    for name, method in gmail_api.METHODS.items():
        described = _described(name)
        query = {k for k, v in described.get("parameters", {}).items()
                 if v["location"] == "query"}
        path = {k for k, v in described.get("parameters", {}).items()
                if v["location"] == "path"}
        assert (method.http_method, method.path) == (described["httpMethod"],
                                                      described["path"]), name
        assert method.query <= query, (name, method.query - query)
        assert path == set(gmail_api._PATH_PARAMETER.findall(method.path)), name
        assert method.body == ("request" in described), name


# Every call GmailProvider makes, with values that need encoding: an address with '+', '@' and
# a quote, ids with '/', a space and non-ASCII, a query with ':' and spaces, a repeated list.
CALLS: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = [
    ("getProfile", None, {"userId": USER}),
    ("threads.list", None, {"userId": USER, "maxResults": 500, "includeSpamTrash": True,
                            "q": "after:1700000000 before:1750000000",
                            "pageToken": "tok+en/=="}),
    ("threads.list", None, {"userId": USER, "maxResults": 1, "includeSpamTrash": False}),
    ("threads.get", None, {"userId": USER, "id": "18c/ab d", "format": "full"}),
    ("messages.list", None, {"userId": USER, "maxResults": 50, "includeSpamTrash": True}),
    ("messages.get", None, {"userId": USER, "id": "ünï", "format": "full"}),
    ("messages.attachments.get", None, {"userId": USER, "messageId": "m/1",
                                        "id": "ANGjdJ_x-y%z"}),
    ("history.list", None, {"userId": USER, "startHistoryId": "123456789012",
                            "maxResults": 500, "pageToken": "p",
                            "historyTypes": ["messageAdded", "messageDeleted", "labelAdded",
                                             "labelRemoved"]}),
    ("watch", {"topicName": "projects/p/topics/t", "labelFilterBehavior": "exclude",
               "labelIds": []}, {"userId": USER}),
    ("stop", None, {"userId": USER}),
]


@pytest.mark.parametrize(("name", "body", "params"), CALLS,
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(CALLS)])
def test_each_request_is_the_one_the_discovery_client_builds(
        name: str, body: dict[str, Any] | None, params: dict[str, Any]) -> None:
    ours = gmail_api.build(ROOT, name, body, **params)
    theirs = _theirs(name, body, params)
    # alt=json is the API's default answer format: the discovery client spells it out.
    their_uri = theirs.uri.replace("?alt=json", "").replace("&alt=json", "").rstrip("?")
    assert (ours.method, ours.uri) == (theirs.method, their_uri)
    assert (None if ours.body is None else json.loads(ours.body)) == \
        (None if theirs.body is None else json.loads(theirs.body))


def test_a_parameter_the_method_lacks_is_refused_as_google_refuses_it() -> None:
    with pytest.raises(TypeError):
        _theirs("threads.get", None, {"userId": USER, "id": "t", "pageToken": "p"})
    with pytest.raises(TypeError, match="pageToken"):
        gmail_api.build(ROOT, "threads.get", userId=USER, id="t", pageToken="p")
    with pytest.raises(TypeError, match="id"):
        gmail_api.build(ROOT, "threads.get", userId=USER)
    with pytest.raises(TypeError, match="body"):
        gmail_api.build(ROOT, "stop", {"x": 1}, userId=USER)
