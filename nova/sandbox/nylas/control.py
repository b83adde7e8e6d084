"""``/_sandbox/...`` control API (no auth; loopback test tool), mirroring the Python API.

* ``GET  /_sandbox/stats``, ``POST /_sandbox/stats/reset``
* ``GET  /_sandbox/grants`` -- grant objects plus thread counts
* ``POST /_sandbox/faults`` -- ``{"rates": {kind: share}, "inject": [{"kind", "count",
  "endpoint", "grant_id"}], "clear": bool, "hang_seconds": float}``
* ``GET  /_sandbox/config``; ``POST /_sandbox/config`` -- any of ``{"latency_ms": int,
  "rate_limit": float | null, "rate_limit_kind": "nylas" | "provider", "retry_after_share":
  float, "retry_after": int (the forced rate_limit fault's Retry-After), "message_variant":
  null | "transformed" | "metadata" | "cleaned", "transformed_fields": [str],
  "cursor_ttl_seconds": float | null, "webhook_gzip": bool, "webhook_retry_delays":
  [float]}``; answers the whole configuration.  (``hostile`` is constructor-only: it shapes
  the generated mailbox.)
* ``POST /_sandbox/cursors/expire`` -- invalidate every page token issued so far
* ``POST /_sandbox/grants/{gid}/messages`` -- add a message (``thread_id``, ``subject``,
  ``body``, ``unread``, ``starred``, ``folders``, ``date``, ``send``, ``duplicate``,
  ``tracked``, ``generated``: ``[[filename, content_type, size], ...]`` attachments of
  pseudo-random bytes made as they are served)
* ``PATCH /_sandbox/grants/{gid}/messages/{mid}`` -- ``unread``, ``starred``, ``folders``
* ``DELETE /_sandbox/grants/{gid}/messages/{mid}``
* ``POST /_sandbox/grants/{gid}/replies`` -- ``{"n", "older_than_rank"?, "seed"?}``: reply to
  ``n`` threads far down the list; answers ``{"thread_ids": [...]}``
* ``GET  /_sandbox/grants/{gid}/hostile`` -- ``{thread_id: [kind, ...]}``
* ``POST /_sandbox/grants/{gid}/expire``, ``POST /_sandbox/grants/{gid}/revive``
  (re-authentication: ``grant.updated`` 25027), ``POST /_sandbox/grants/{gid}/update``
  (``grant.updated`` 25014), ``DELETE /_sandbox/grants/{gid}``
* ``POST /_sandbox/webhooks/hold``, ``POST /_sandbox/webhooks/release`` (``{"order":
  "fifo" | "reverse" | "shuffle" | [indices]}``), ``GET /_sandbox/webhooks`` (delivery log)

Mutations answer ``{"message"?, "thread"?, "grant"?, "notifications": [payload, ...]}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import errors
from .errors import SafeJSONResponse as JSONResponse

if TYPE_CHECKING:
    from .server import Mutation, SandboxNylas


def control_routes(sb: SandboxNylas) -> list[Route]:
    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        data = await request.json()
        return data if isinstance(data, dict) else {}

    def mutation(m: Mutation) -> JSONResponse:
        return JSONResponse(m.to_json())

    def guard(fn: Callable[[Request], Awaitable[Response]],
              ) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            try:
                return await fn(request)
            except KeyError as exc:
                return errors.not_found(f"{exc.args[0] if exc.args else 'Object'}")
            except (ValueError, TypeError) as exc:
                return errors.bad_request(str(exc))
        return route

    async def stats(request: Request) -> Response:
        return JSONResponse(sb.get_stats())

    async def reset(request: Request) -> Response:
        sb.reset_stats()
        return JSONResponse({"ok": True})

    async def grants(request: Request) -> Response:
        return JSONResponse([{**g.to_json(), "threads": g.n_threads, "deleted": g.deleted}
                             for g in sb.mailbox.grants.values()])

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
                            endpoint=inj.get("endpoint"), grant_id=inj.get("grant_id"))
        return JSONResponse({"rates": sb.faults.rates})

    def current_config() -> dict[str, Any]:
        return {"latency_ms": sb.latency_ms, "rate_limit": sb.limiter.rate,
                "rate_limit_kind": sb.limiter.kind,
                "retry_after_share": sb.limiter.retry_after_share,
                "retry_after": sb.forced_retry_after,
                "message_variant": sb.webhooks.message_variant,
                "transformed_fields": list(sb.webhooks.transformed_fields),
                "cursor_ttl_seconds": sb.mailbox.cursor_ttl,
                "webhook_gzip": sb.outbox.gzipped,
                "webhook_retry_delays": list(sb.outbox.retry_delays),
                "hostile": sb.mailbox.hostile}

    async def config(request: Request) -> Response:
        data = await body(request)
        if "latency_ms" in data:
            sb.set_latency(int(data["latency_ms"]))
        if "rate_limit_kind" in data or "retry_after_share" in data:
            sb.limiter.configure(kind=data.get("rate_limit_kind"),
                                 retry_after_share=data.get("retry_after_share"))
        if "rate_limit" in data:
            sb.set_rate_limit(data["rate_limit"])
        if "retry_after" in data:
            sb.forced_retry_after = int(data["retry_after"])
        if "message_variant" in data or "transformed_fields" in data:
            sb.set_message_variant(data.get("message_variant", sb.webhooks.message_variant),
                                   data.get("transformed_fields"))
        if "cursor_ttl_seconds" in data:
            ttl = data["cursor_ttl_seconds"]
            sb.set_cursor_ttl(None if ttl is None else float(ttl))
        if "webhook_gzip" in data or "webhook_retry_delays" in data:
            sb.set_webhook_delivery(gzip=data.get("webhook_gzip"),
                                    retry_delays=data.get("webhook_retry_delays"))
        return JSONResponse(current_config())

    async def get_config(request: Request) -> Response:
        return JSONResponse(current_config())

    async def expire_cursors(request: Request) -> Response:
        sb.expire_cursors()
        return JSONResponse({"expired": True})

    async def replies(request: Request) -> Response:
        data = await body(request)
        if "n" not in data:
            raise ValueError("n (how many threads to reply to) is required")
        kwargs = {k: data[k] for k in ("older_than_rank", "seed") if k in data}
        tids = sb.reply_to_random_threads(request.path_params["grant_id"], int(data["n"]),
                                          **kwargs)
        return JSONResponse({"thread_ids": tids})

    async def hostile(request: Request) -> Response:
        return JSONResponse(sb.hostile_threads(request.path_params["grant_id"]))

    async def update_grant(request: Request) -> Response:
        return mutation(sb.update_grant(request.path_params["grant_id"]))

    async def add(request: Request) -> Response:
        data = await body(request)
        allowed = {"thread_id", "subject", "body", "unread", "starred", "folders", "date",
                   "send", "duplicate", "tracked", "generated"}
        kwargs = {k: v for k, v in data.items() if k in allowed}
        return mutation(sb.add_message(request.path_params["grant_id"], **kwargs))

    async def update(request: Request) -> Response:
        data = await body(request)
        kwargs = {k: v for k, v in data.items()
                  if k in {"unread", "starred", "folders", "send", "duplicate"}}
        return mutation(sb.update_message(request.path_params["grant_id"],
                                          request.path_params["message_id"], **kwargs))

    async def delete(request: Request) -> Response:
        return mutation(sb.delete_message(request.path_params["grant_id"],
                                          request.path_params["message_id"]))

    async def expire(request: Request) -> Response:
        return mutation(sb.expire_grant(request.path_params["grant_id"]))

    async def revive(request: Request) -> Response:
        return mutation(sb.revive_grant(request.path_params["grant_id"]))

    async def delete_grant(request: Request) -> Response:
        return mutation(sb.delete_grant(request.path_params["grant_id"]))

    async def hold(request: Request) -> Response:
        sb.hold_webhooks()
        return JSONResponse({"held": True})

    async def release(request: Request) -> Response:
        data = await body(request)
        sent = sb.release_webhooks(data.get("order", "fifo"))
        return JSONResponse({"released": [n.id for n in sent]})

    async def webhook_log(request: Request) -> Response:
        return JSONResponse(sb.webhook_log)

    p = "/_sandbox"
    g = p + "/grants/{grant_id}"
    return [
        Route(p + "/stats", guard(stats)),
        Route(p + "/stats/reset", guard(reset), methods=["POST"]),
        Route(p + "/grants", guard(grants)),
        Route(p + "/faults", guard(faults), methods=["POST"]),
        Route(p + "/config", guard(config), methods=["POST"]),
        Route(p + "/config", guard(get_config), methods=["GET"]),
        Route(p + "/cursors/expire", guard(expire_cursors), methods=["POST"]),
        Route(g + "/replies", guard(replies), methods=["POST"]),
        Route(g + "/hostile", guard(hostile), methods=["GET"]),
        Route(g + "/update", guard(update_grant), methods=["POST"]),
        Route(g + "/messages", guard(add), methods=["POST"]),
        Route(g + "/messages/{message_id}", guard(update), methods=["PATCH"]),
        Route(g + "/messages/{message_id}", guard(delete), methods=["DELETE"]),
        Route(g + "/expire", guard(expire), methods=["POST"]),
        Route(g + "/revive", guard(revive), methods=["POST"]),
        Route(g, guard(delete_grant), methods=["DELETE"]),
        Route(p + "/webhooks/hold", guard(hold), methods=["POST"]),
        Route(p + "/webhooks/release", guard(release), methods=["POST"]),
        Route(p + "/webhooks", guard(webhook_log)),
    ]
