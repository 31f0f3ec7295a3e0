"""The usage API of the admin port (README, "Metering"): a key's use, a quota's reset, credit,
the history of a key and the billing export of every key.

    GET    /admin/usage/{key_name}             per product: plan, rate, and quota use
    DELETE /admin/usage/{key_name}/{product}   start that quota afresh (credit stays); 204
    POST   /admin/usage/{key_name}/{product}/credit   {"amount": N}: N more units this period
    GET    /admin/usage/{key_name}/history?from=YYYY-MM-DD&to=YYYY-MM-DD   requests, units per day
    GET    /admin/usage.csv?from=YYYY-MM-DD&to=YYYY-MM-DD   every key's days, streamed as CSV
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from aiohttp import web

from gateway.admin_json import ADMIN_ROUTE, json_object, only_fields, only_parameters
from gateway.admin_state import ADMIN_STATE, AdminState, within_storage_timeout
from gateway.config.instants import format_instant
from gateway.config.model import MAX_COUNT, ApiKey, Config, Plan, QuotaRule, not_in_config
from gateway.limits.base import (
    HISTORY_DAYS,
    DayUsage,
    QuotaUsage,
    StorageError,
    day_number,
    day_of,
    day_text,
)
from gateway.problems import BadRequest, Conflict, NotFound, StorageUnavailable

log = logging.getLogger("gateway.admin")


def add_usage_routes(app: web.Application) -> None:
    # No HEAD: the export streams, and a HEAD would run it all for a head that cannot say its
    # length (aiohttp's automatic HEAD also sent the body).
    app.router.add_get("/admin/usage.csv", _usage_csv, allow_head=False, **ADMIN_ROUTE)
    app.router.add_get("/admin/usage/{key_name}", _get_usage, **ADMIN_ROUTE)
    app.router.add_delete("/admin/usage/{key_name}/{product}", _reset_usage, **ADMIN_ROUTE)
    app.router.add_post("/admin/usage/{key_name}/{product}/credit", _add_credit, **ADMIN_ROUTE)
    app.router.add_get("/admin/usage/{key_name}/history", _get_history, **ADMIN_ROUTE)


async def _get_usage(request: web.Request) -> web.Response:
    only_parameters(request, ())
    state = request.app[ADMIN_STATE]
    key = _find_key(state, state.get_config(), request.match_info["key_name"])
    return web.json_response(await _usage_of(state, key))


async def _usage_of(
    state: AdminState, key: ApiKey, known: dict[str, QuotaUsage] | None = None
) -> dict[str, Any]:
    """The key's plan, rate and quota use on each of its products (limits with overrides);
    `known`: the quota use of some products (by product) as a storage call just answered it,
    not asked again."""
    config = state.get_config()
    missing = not_in_config(key.plans, config.products, config.plans)
    products: dict[str, Any] = {}
    for product in sorted(key.plans):
        plan = key.plan_for(product, config.plans)
        if plan is None:
            # An API key's plan that a reload took out of the config: shown, marked, but
            # without limits or use. Which quota counter holds its use depends on the plan's
            # period, which only the plan says; the counter is left as it is for the plan's
            # return, and the history and the export keep the use by day meanwhile.
            products[product] = {
                "plan": key.plans[product],
                "not_in_config": "plan",
                "rate": None,
                "quota": None,
            }
            continue
        quota: dict[str, Any] | None = None
        if plan.quota is not None:
            usage = (known or {}).get(product)
            if usage is None:
                usage = await within_storage_timeout(
                    state, state.limiter.usage(f"{key.name}:{product}", plan.quota)
                )
            quota = _quota_json(state, plan.quota, usage)
        products[product] = {
            "plan": plan.name,
            # "product": a product a reload took out; its plan, and so its use, is still known.
            "not_in_config": missing.get(product),
            "rate": _rate_json(plan),
            "quota": quota,
        }
    return {"key": key.name, "disabled": key.disabled, "products": products}


async def _reset_usage(request: web.Request) -> web.Response:
    only_parameters(request, ())
    state = request.app[ADMIN_STATE]
    key, product, quota = _key_quota(request, state, "to reset")
    # A reset says nothing but its path: a field (a period, a product) is a mistake to name,
    # not a reset of this period's use made as if it were not there.
    only_fields(await json_object(request, required=False), ())
    await within_storage_timeout(state, state.limiter.reset_quota(f"{key.name}:{product}", quota))
    return web.Response(status=204)


# An idempotency key: what payment APIs accept (Stripe's up to 255 characters), printable
# ASCII so that it is safe inside a Redis key name and a log line.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


async def _add_credit(request: web.Request) -> web.Response:
    """A credit answered 503 may still be applied later (the storage may run a command it got
    after the gateway stopped waiting): a retry with the same `Idempotency-Key` adds it once."""
    only_parameters(request, ())
    state = request.app[ADMIN_STATE]
    key, product, quota = _key_quota(request, state, "to credit")
    given = request.headers.getall("Idempotency-Key", [])
    if len(given) > 1:
        raise BadRequest("Idempotency-Key: given twice; send one.")
    once = given[0] if given else None
    if once is not None and _IDEMPOTENCY_KEY.fullmatch(once) is None:
        raise BadRequest("Idempotency-Key: must be 1 to 255 visible ASCII characters.")
    body = only_fields(await json_object(request, required=True), ("amount",))
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= MAX_COUNT:
        raise BadRequest(f"amount: must be a whole number from 1 to {MAX_COUNT}.")
    subject = f"{key.name}:{product}"
    credited = await within_storage_timeout(
        state, state.limiter.credit(subject, quota, amount, once)
    )
    if credited.replayed and credited.amount != amount:
        raise Conflict(
            f"Idempotency-Key '{once}' was used for a credit of {credited.amount} units,"
            f" not {amount}."
        )
    headers = {"Idempotent-Replayed": "true"} if credited.replayed else None
    usage = await _usage_of(state, key, {product: credited.usage})
    return web.json_response(usage, headers=headers)


def _key_quota(
    request: web.Request, state: AdminState, purpose: str
) -> tuple[ApiKey, str, QuotaRule]:
    """The key, product and quota a /admin/usage/{key_name}/{product} call is about, or 404."""
    config = state.get_config()
    key = _find_key(state, config, request.match_info["key_name"])
    product = request.match_info["product"]
    plan = key.plan_for(product, config.plans)
    if plan is None:
        name = key.plans.get(product)
        if name is not None:
            raise NotFound(
                f"The plan '{name}' of key '{key.name}' for product '{product}' is not in the"
                f" running config: its quota, and the counter of its period, are not known"
                f" until it is back."
            )
        raise NotFound(f"Key '{key.name}' has no plan for product '{product}'.")
    if plan.quota is None:
        raise NotFound(f"Plan '{plan.name}' of product '{product}' has no quota {purpose}.")
    return key, product, plan.quota


async def _get_history(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    name = request.match_info["key_name"]
    first, last = _day_range(request)
    days = await within_storage_timeout(state, state.limiter.history(name, first, last))
    if not days and _key_named(state, state.get_config(), name) is None:
        # A key deleted since, or taken out of the config, is still on the bill: a range
        # without its use is an empty list, as for a key that exists. 404 is for a name with
        # no day of use kept at all (one more read, only for such names).
        today = day_of(state.clock())
        kept = state.limiter.history(name, today - HISTORY_DAYS, today)
        if not await within_storage_timeout(state, kept):
            raise NotFound(
                f"No key is named '{name}', and none by that name has history in the "
                f"{HISTORY_DAYS} days kept."
            )
    return web.json_response(
        {
            "key": name,
            "from": day_text(first),
            "to": day_text(last),
            "days": [
                {
                    "date": day_text(line.day),
                    "product": line.subject.partition(":")[2],
                    "plan": line.plan,
                    "requests": line.requests,
                    "units": line.units,
                }
                for line in days
            ],
        }
    )


CSV_HEADER = b"date,key,product,plan,requests,units\n"


async def _usage_csv(request: web.Request) -> web.StreamResponse:
    """The billing export, streamed a batch at a time as the storage hands them over. A
    storage failure before the first line is a 503; after it, the answer is cut short (no
    final chunk), so that a client cannot take a truncated export for a whole one."""
    state = request.app[ADMIN_STATE]
    first, last = _day_range(request)
    batches = state.limiter.export(first, last)
    try:
        try:
            batch: list[DayUsage] | None = await anext(batches)
        except StopAsyncIteration:
            batch = None
        except (StorageError, TimeoutError) as exc:
            raise StorageUnavailable() from exc
        name = f"usage-{day_text(first)}-{day_text(last)}.csv"
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": f'attachment; filename="{name}"',
            }
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(CSV_HEADER)
        while batch is not None:
            await response.write(_csv_lines(batch))
            try:
                batch = await anext(batches)
            except StopAsyncIteration:
                batch = None
            except (StorageError, TimeoutError):
                log.exception("the usage export failed after it began; the answer is cut short")
                if request.transport is not None:
                    request.transport.abort()
                return response
        await response.write_eof()
        return response
    finally:
        await batches.aclose()


def _csv_lines(batch: list[DayUsage]) -> bytes:
    # Key names, products and plans are names of [A-Za-z0-9._-]: nothing to quote.
    return "".join(
        f"{day_text(line.day)},{line.subject.replace(':', ',', 1)},{line.plan},"
        f"{line.requests},{line.units}\n"
        for line in batch
    ).encode()


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _day_range(request: web.Request) -> tuple[int, int]:
    """`from` and `to` (UTC dates, both included) within the history kept; by default `to` is
    today and `from` the first of its month. 400 naming the parameter when it is not a date,
    or not one of these two, or given twice."""
    only_parameters(request, ("from", "to"))
    today = day_of(request.app[ADMIN_STATE].clock())
    days: dict[str, int] = {}
    for name in ("from", "to"):
        text = request.query.get(name)
        if text is None:
            continue
        if not _DATE.fullmatch(text):
            raise BadRequest(f"{name}: must be a date like 2026-12-01 (YYYY-MM-DD), not {text!r}.")
        try:
            days[name] = day_number(text)
        except ValueError:
            raise BadRequest(f"{name}: {text!r} is not a date in the calendar.") from None
    if "from" in days and "to" in days and days["from"] > days["to"]:
        raise BadRequest("from: must not be after to.")
    last = min(days.get("to", today), today)
    first = days.get("from", day_number(day_text(last)[:8] + "01"))
    if first > last:
        # `from` is not after `to` (checked above): after today, where a `to` ends anyway.
        raise BadRequest(
            f"from: must not be after today ({day_text(today)}), the last day with history."
        )
    oldest = today - HISTORY_DAYS
    if last < oldest:
        raise BadRequest(
            f"to: history is kept for {HISTORY_DAYS} days, from {day_text(oldest)} on."
        )
    return max(first, oldest), last


def _find_key(state: AdminState, config: Config, name: str) -> ApiKey:
    """The file's key called `name`, else the API's; 404 when neither has it."""
    key = _key_named(state, config, name)
    if key is None:
        raise NotFound(f"No key is named '{name}'.")
    return key


def _key_named(state: AdminState, config: Config, name: str) -> ApiKey | None:
    if state.keys is not None:
        return state.keys.get_snapshot().keys.by_name(name)
    return config.key_by_name(name)


def _quota_json(state: AdminState, quota: QuotaRule, usage: QuotaUsage) -> dict[str, Any]:
    return {
        "limit": usage.limit,
        "credit": usage.credit,
        "per": quota.per,
        "timezone": quota.timezone.key,
        "used": usage.used,
        "remaining": usage.remaining,
        "reset": format_instant(usage.reset_at),
        "reset_seconds": max(0, math.ceil(usage.reset_at - state.clock())),
    }


def _rate_json(plan: Plan) -> dict[str, Any] | None:
    if plan.rate is None:
        return None
    return {"limit": plan.rate.limit, "per": plan.rate.per, "window_seconds": plan.rate.window}
