"""``/_sandbox/...`` control API (no auth; a loopback test tool), mirroring the Python API.

* ``GET  /_sandbox/stats``, ``POST /_sandbox/stats/reset``, ``POST /_sandbox/quota/reset``
* ``GET  /_sandbox/users`` -- ``[{email, threads, scope, historyId, credentials}]``
* ``GET  /_sandbox/config``; ``POST /_sandbox/config`` -- any of ``{"latency_ms",
  "quota_per_minute", "quota_window", "method_costs", "quota_error", "quota_retry_after",
  "project_quota_per_minute", "max_concurrent", "history_max_records", "history_max_age",
  "attachment_id_ttl", "push": {PushConfig fields}}``; answers the whole configuration
* ``POST /_sandbox/faults`` -- ``{"rates": {kind: share}, "inject": [{"kind", "count",
  "endpoint", "user"}], "clear": bool, "hang_seconds": float}``
* ``POST /_sandbox/users/{email}/messages`` -- add (``thread_id``, ``subject``, ``text``,
  ``html``, ``labels``, ``date_ms``, ``generated``: ``[[filename, type, size], ...]``)
* ``DELETE /_sandbox/users/{email}/messages/{id}``
* ``POST /_sandbox/users/{email}/messages/{id}/labels`` -- ``{"add": [...], "remove": [...]}``
* ``POST /_sandbox/users/{email}/history/expire`` -- ``{"through"?: int}``
* ``POST /_sandbox/users/{email}/revoke``, ``POST /_sandbox/users/{email}/reauthorize``
  (answers new credentials), ``POST /_sandbox/users/{email}/scope`` ``{"scope"}``
* ``POST /_sandbox/tokens/expire`` -- ``{"email"?: str}``
* ``GET  /_sandbox/users/{email}/hostile``
* ``GET  /_sandbox/users/{email}/mailbox`` -- the whole mailbox at once, for checkers:
  ``{historyId, threads: [{id, messageIds}], messages: [{id, threadId, internalDate,
  labelIds}]}`` (spam and trash included; no quota, no faults)
* ``GET  /_sandbox/push`` (delivery log), ``POST /_sandbox/push/drop`` ``{"count"}``,
  ``POST /_sandbox/push/hold`` and ``/_sandbox/push/release`` (changes meanwhile coalesce)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import dumps

if TYPE_CHECKING:
    from .server import SandboxGmail


def _json(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def control_routes(sb: SandboxGmail) -> list[Route]:
    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        data = await request.json()
        return data if isinstance(data, dict) else {}

    def guard(fn: Callable[[Request], Awaitable[Response]],
              ) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            try:
                return await fn(request)
            except KeyError as exc:
                return _json({"error": f"not found: {exc.args[0] if exc.args else ''}"}, 404)
            except (ValueError, TypeError) as exc:
                return _json({"error": str(exc)}, 400)
        return route

    def email(request: Request) -> str:
        return sb.mailbox.user(request.path_params["email"]).email

    def current_config() -> dict[str, Any]:
        q, cfg = sb.quota, sb.push.config
        return {"latency_ms": sb.latency_ms, "quota_per_minute": q.per_minute,
                "quota_window": q.window, "method_costs": dict(q.costs),
                "quota_error": q.error, "quota_retry_after": q.retry_after,
                "project_quota_per_minute": q.project_per_minute,
                "max_concurrent": sb.gate.limit,
                "history_max_records": sb.mailbox.history_max_records,
                "history_max_age": sb.mailbox.history_max_age,
                "attachment_id_ttl": sb.attachment_ids.ttl,
                "hang_seconds": sb.faults.hang_seconds,
                "push": {"endpoint": cfg.endpoint, "auth": cfg.auth,
                         "audience": cfg.audience, "min_interval": cfg.min_interval,
                         "delay": cfg.delay, "drop_share": cfg.drop_share,
                         "number_share": cfg.number_share, "excess": cfg.excess,
                         "retry_delays": list(cfg.retry_delays), "watch_ttl": cfg.watch_ttl}}

    async def config(request: Request) -> Response:
        data = await body(request)
        if "latency_ms" in data:
            sb.set_latency(int(data["latency_ms"]))
        quota: dict[str, Any] = {}
        for key, arg in (("quota_per_minute", "per_minute"), ("quota_window", "window"),
                         ("method_costs", "costs"), ("quota_error", "error"),
                         ("quota_retry_after", "retry_after"),
                         ("project_quota_per_minute", "project_per_minute")):
            if key in data:
                quota[arg] = data[key]
        if quota:
            sb.set_quota(**quota)
        if "max_concurrent" in data:
            sb.set_max_concurrent(data["max_concurrent"])
        retention = {k: data[f"history_{k}"] for k in ("max_records", "max_age")
                     if f"history_{k}" in data}
        if retention:
            sb.set_history_retention(**retention)
        if "attachment_id_ttl" in data:
            sb.set_attachment_id_ttl(data["attachment_id_ttl"])
        if isinstance(data.get("push"), dict):
            sb.set_push(**data["push"])
        return _json(current_config())

    async def get_config(request: Request) -> Response:
        return _json(current_config())

    async def stats(request: Request) -> Response:
        return _json(sb.get_stats())

    async def reset(request: Request) -> Response:
        sb.reset_stats()
        return _json({"ok": True})

    async def reset_quota(request: Request) -> Response:
        sb.reset_quota()
        return _json({"ok": True})

    async def users(request: Request) -> Response:
        return _json([{"email": e, "threads": sb.mailbox.user(e).n_threads,
                       "scope": sb.oauth.grants[e].scope, "historyId": str(sb.history_id(e)),
                       "credentials": sb.credentials(e)} for e in sb.users])

    async def faults(request: Request) -> Response:
        data = await body(request)
        if data.get("clear"):
            sb.clear_faults()
        if "hang_seconds" in data:
            sb.faults.hang_seconds = float(data["hang_seconds"])
        if data.get("rates"):
            sb.set_fault_rates(**data["rates"])
        for inj in data.get("inject", []):
            sb.inject_fault(inj["kind"], int(inj.get("count", 1)),
                            endpoint=inj.get("endpoint"), user=inj.get("user"))
        return _json({"rates": sb.faults.rates})

    async def add(request: Request) -> Response:
        data = await body(request)
        allowed = {"thread_id", "subject", "text", "html", "labels", "date_ms", "generated"}
        kwargs = {k: v for k, v in data.items() if k in allowed}
        if "generated" in kwargs:
            kwargs["generated"] = [tuple(g) for g in kwargs["generated"]]
        return _json(sb.add_message(email(request), **kwargs))

    async def delete(request: Request) -> Response:
        return _json(sb.delete_message(email(request), request.path_params["mid"]))

    async def labels(request: Request) -> Response:
        data = await body(request)
        return _json(sb.modify_labels(email(request), request.path_params["mid"],
                                      add=data.get("add", []), remove=data.get("remove", [])))

    async def expire_history(request: Request) -> Response:
        data = await body(request)
        return _json({"floor": str(sb.expire_history(email(request), data.get("through")))})

    async def revoke(request: Request) -> Response:
        sb.revoke(email(request))
        return _json({"revoked": True})

    async def reauthorize(request: Request) -> Response:
        data = await body(request)
        return _json(sb.reauthorize(email(request), data.get("scope")))

    async def scope(request: Request) -> Response:
        data = await body(request)
        sb.set_scope(email(request), str(data["scope"]))
        return _json({"scope": data["scope"]})

    async def expire_tokens(request: Request) -> Response:
        data = await body(request)
        return _json({"expired": sb.expire_access_tokens(data.get("email"))})

    async def hostile(request: Request) -> Response:
        return _json(sb.hostile_threads(email(request)))

    async def dump(request: Request) -> Response:
        user = email(request)
        threads: list[dict[str, Any]] = []
        messages: list[dict[str, Any]] = []
        with sb.mailbox.lock:  # one consistent picture, even while mail still changes
            for tid in sb.thread_ids(user):
                spec = sb.mailbox.thread(user, tid)
                if spec is None:
                    continue
                threads.append({"id": tid, "messageIds": [m.id for m in spec.messages]})
                messages += [{"id": m.id, "threadId": tid, "internalDate": str(m.internal_ms),
                              "labelIds": list(m.labels)} for m in spec.messages]
            history_id = str(sb.history_id(user))
        return _json({"historyId": history_id, "threads": threads, "messages": messages})

    async def push_log(request: Request) -> Response:
        return _json(sb.push_log)

    async def push_drop(request: Request) -> Response:
        data = await body(request)
        sb.drop_next_push(int(data.get("count", 1)))
        return _json({"ok": True})

    async def push_hold(request: Request) -> Response:
        sb.hold_push()
        return _json({"held": True})

    async def push_release(request: Request) -> Response:
        sb.release_push()
        return _json({"held": False})

    p = "/_sandbox"
    u = p + "/users/{email}"
    return [
        Route(p + "/stats", guard(stats)),
        Route(p + "/stats/reset", guard(reset), methods=["POST"]),
        Route(p + "/quota/reset", guard(reset_quota), methods=["POST"]),
        Route(p + "/users", guard(users)),
        Route(p + "/config", guard(config), methods=["POST"]),
        Route(p + "/config", guard(get_config), methods=["GET"]),
        Route(p + "/faults", guard(faults), methods=["POST"]),
        Route(p + "/tokens/expire", guard(expire_tokens), methods=["POST"]),
        Route(p + "/push", guard(push_log)),
        Route(p + "/push/drop", guard(push_drop), methods=["POST"]),
        Route(p + "/push/hold", guard(push_hold), methods=["POST"]),
        Route(p + "/push/release", guard(push_release), methods=["POST"]),
        Route(u + "/messages", guard(add), methods=["POST"]),
        Route(u + "/messages/{mid}", guard(delete), methods=["DELETE"]),
        Route(u + "/messages/{mid}/labels", guard(labels), methods=["POST"]),
        Route(u + "/history/expire", guard(expire_history), methods=["POST"]),
        Route(u + "/revoke", guard(revoke), methods=["POST"]),
        Route(u + "/reauthorize", guard(reauthorize), methods=["POST"]),
        Route(u + "/scope", guard(scope), methods=["POST"]),
        Route(u + "/hostile", guard(hostile)),
        Route(u + "/mailbox", guard(dump)),
    ]
