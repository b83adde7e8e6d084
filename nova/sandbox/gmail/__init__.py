"""Gmail API v1 sandbox: a deterministic, fault-injecting Gmail look-alike served over HTTP.

Usage::

    with SandboxGmail(threads=5000, seed=1) as sb:
        email = sb.users[0]
        info = sb.credentials(email)  # authorized_user: client_id, client_secret, refresh_token
        creds = google.oauth2.credentials.Credentials(
            token=None, refresh_token=info["refresh_token"], client_id=info["client_id"],
            client_secret=info["client_secret"], token_uri=sb.token_uri)
        service = googleapiclient.discovery.build(
            "gmail", "v1", credentials=creds, static_discovery=True,
            client_options={"api_endpoint": sb.api_endpoint})
        service.users().threads().list(userId="me").execute()
        batch = googleapiclient.http.BatchHttpRequest(batch_uri=sb.batch_uri)

Pointing Google's Python clients at it (read in google-api-python-client 2.x and google-auth
2.x; these are traps, not preferences):

* ``api_endpoint`` is the *root* URL: the discovery document has ``rootUrl``
  ``https://gmail.googleapis.com/``, empty ``servicePath`` and method paths
  ``gmail/v1/users/{userId}/...``; ``build`` replaces the root with ``api_endpoint`` and joins
  the paths to it.  So ``sb.base_url`` (no ``/gmail/v1`` suffix).
* ``service.new_batch_http_request()`` takes only ``callback`` (passing ``batch_uri=`` is a
  TypeError in 2.202) and posts to ``rootUrl + batchPath`` =
  ``https://gmail.googleapis.com/batch`` whatever ``api_endpoint`` says: build
  ``googleapiclient.http.BatchHttpRequest(callback=..., batch_uri=sb.batch_uri)`` instead.
  (The sandbox serves ``/batch`` too, for clients that post there.)
* ``Credentials.from_authorized_user_info`` always sets Google's token endpoint, even when the
  info carries ``token_uri`` ("always overrides", in its source); construct
  ``Credentials(token=None, refresh_token=..., client_id=..., client_secret=...,
  token_uri=sb.token_uri)`` yourself.  google-auth refreshes 3 min 45 s before expiry, so an
  access-token TTL under 225 s means a refresh before every request; expire tokens
  server-side (:meth:`SandboxGmail.expire_access_tokens`) to exercise the 401-then-refresh
  path.  httplib2's default timeout in the client is 60 s (``hang_seconds`` defaults past it).
* ``google.oauth2.id_token.verify_oauth2_token`` has no ``certs_url`` argument in google-auth
  2.x; verify push JWTs with ``id_token.verify_token(token, request, audience=...,
  certs_url=sb.certs_url)`` and then check ``iss``, ``email`` and ``email_verified`` yourself
  (that is all ``verify_oauth2_token`` adds).  ``sb.certs_url`` serves Google's x509 format
  ``{kid: PEM}``; ``sb.jwks_url`` serves a JWK set, which google-auth reads only with pyjwt.

Modules cite the developers.google.com pages they model: :mod:`.api` (endpoints),
:mod:`.mime` (MIME and the payload), :mod:`.mailbox` (listing, history, attachment ids),
:mod:`.state` (quota, concurrency, faults), :mod:`.batch`, :mod:`.auth` (OAuth, signing key),
:mod:`.push` (watch and Pub/Sub push), :mod:`.errors`.

CLI: ``python -m nova.sandbox.gmail --port 8766 --threads 5000 --seed 1``.
"""

from .auth import FULL, METADATA, MODIFY, READONLY
from .generate import SYSTEM_LABELS, USER_LABELS
from .push import AUTH_MODES, SUCCESS
from .server import SandboxGmail
from .state import DEFAULT_COSTS, FAULT_KINDS, QUOTA_ERRORS

__all__ = ["AUTH_MODES", "DEFAULT_COSTS", "FAULT_KINDS", "FULL", "METADATA", "MODIFY",
           "QUOTA_ERRORS", "READONLY", "SUCCESS", "SYSTEM_LABELS", "USER_LABELS",
           "SandboxGmail"]
