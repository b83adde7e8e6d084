"""``/_sandbox/...`` control API (no auth; loopback test tool), mirroring the Python API.

* ``GET  /_sandbox/stats``, ``POST /_sandbox/stats/reset``
* ``GET  /_sandbox/grants`` -- grant objects plus thread counts
* ``POST /_sandbox/faults`` -- ``{"rates": {kind: share}, "inject": [{"kind", "count",
  "endpoint", "grant_id"}], "clear": bool, "hang_seconds": float}``
* ``POST /_sandbox/config`` -- ``{"latency_ms": int, "rate_limit": float | null}``
* ``POST /_sandbox/grants/{gid}/messages`` -- add a message (``thread_id``, ``subject``,
  ``body``, ``unread``, ``starred``, ``folders``, ``send``, ``duplicate``)
* ``PATCH /_sandbox/grants/{gid}/messages/{mid}`` -- ``unread``, ``starred``, ``folders``
* ``DELETE /_sandbox/grants/{gid}/messages/{mid}``
* ``POST /_sandbox/grants/{gid}/expire``, ``POST /_sandbox/grants/{gid}/revive``,
  ``DELETE /_sandbox/grants/{gid}``
* ``POST /_sandbox/webhooks/hold``, ``POST /_sandbox/webhooks/release`` (``{"order":
  "fifo" | "reverse" | "shuffle" | [indices]}``), ``GET /_sandbox/webhooks`` (delivery log)

Mutations answer ``{"message"?, "thread"?, "grant"?, "notifications": [payload, ...]}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import errors

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

    async def config(request: Request) -> Response:
        data = await body(request)
        if "latency_ms" in data:
            sb.set_latency(int(data["latency_ms"]))
        if "rate_limit" in data:
            sb.set_rate_limit(data["rate_limit"])
        return JSONResponse({"latency_ms": sb.latency_ms, "rate_limit": sb.limiter.rate})

    async def add(request: Request) -> Response:
        data = await body(request)
        allowed = {"thread_id", "subject", "body", "unread", "starred", "folders", "date",
                   "send", "duplicate"}
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
