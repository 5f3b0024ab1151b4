"""The console's web app (Starlette + Jinja2 + htmx): sign-in by token, CSRF, role-gated pages.

Sign-in: `/?token=...` (from `facefleet console token`) becomes a signed, HttpOnly, SameSite=Strict
session cookie, and the token leaves the address bar at once (303 to the same page without it).
Without a valid session every page answers 401 with a sign-in form. Each POST must carry the
session's CSRF token (form field `csrf_token` or header `X-CSRF-Token`), else 403. Pages and actions
are gated by the RPC they call (pages.PAGE / pages.ACTION_METHOD), and the scheduler checks again.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from facefleet.config import Settings
from facefleet.console import charts, pages, tokens
from facefleet.console.gateway import CallFailed, Gateway
from facefleet.console.tokens import Person, TokenError

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "facefleet_console"
CSRF_HEADER = "x-csrf-token"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the sign-in address carries a token
    "Cache-Control": "no-store",
}
log = structlog.get_logger()
Handler = Callable[[Request, Person], Awaitable[Response]]


def _money(value: float | None) -> str:
    return "—" if value is None else f"${value:,.2f}"


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True), auto_reload=False
    )
    env.filters["money"] = _money
    env.filters["when"] = _when
    return Jinja2Templates(env=env)


class Console:
    """The routes and their guards, around one Gateway to the scheduler."""

    def __init__(self, settings: Settings, gateway: Gateway, secret: bytes) -> None:
        self.settings = settings
        self.gateway = gateway
        self.secret = secret
        self.templates = _templates()

    # -- rendering -------------------------------------------------------------------------------
    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        person = context.get("person")
        nav = [p for p in pages.PAGES if person is not None and pages.may(person, p.method)]
        flash = request.session.pop("flash", None) if "session" in request.scope else None
        response = self.templates.TemplateResponse(
            request,
            name,
            {"nav": nav, "flash": flash, "csrf": request.session.get("csrf", ""), "path": request.url.path, **context},
            status_code=status,
        )
        response.headers.update(SECURITY_HEADERS)
        return response

    def refuse(self, request: Request, status: int, message: str, person: Person | None = None) -> Response:
        if status == 401:
            return self.render(request, "login.html", status=401, message=message, person=None)
        return self.render(request, "error.html", status=status, message=message, person=person, code=status)

    # -- guards ----------------------------------------------------------------------------------
    def _sign_in(self, request: Request, token: str) -> Response:
        try:
            person = tokens.read(self.secret, token)
        except TokenError as error:
            log.warning("console_sign_in_refused", reason=str(error))
            return self.refuse(request, 401, f"sign-in refused: {error}")
        request.session.clear()
        request.session["person"] = {"sub": person.subject, "roles": sorted(person.roles), "exp": person.expires}
        request.session["csrf"] = secrets.token_urlsafe(32)
        log.info("console_sign_in", subject=person.subject, roles=sorted(person.roles))
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        return RedirectResponse(request.url.path + (f"?{urlencode(rest)}" if rest else ""), status_code=303)

    @staticmethod
    def _person(request: Request) -> Person | None:
        data = request.session.get("person")
        if not isinstance(data, dict):
            return None
        if float(data.get("exp", 0)) <= time.time():
            request.session.clear()
            return None
        return Person(subject=str(data["sub"]), roles=frozenset(data["roles"]), expires=float(data["exp"]))

    def _csrf_ok(self, request: Request, form: Any) -> bool:
        expected = request.session.get("csrf", "")
        given = request.headers.get(CSRF_HEADER) or (form.get("csrf_token") if form is not None else None) or ""
        return bool(expected) and isinstance(given, str) and hmac.compare_digest(expected, given)

    def guarded(self, method: str | None, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Sign-in by token, session, CSRF on POST, role for `method` (None: any signed-in person)."""

        async def endpoint(request: Request) -> Response:
            token = request.query_params.get("token")
            if token is not None and request.method == "GET":
                return self._sign_in(request, token)
            person = self._person(request)
            if person is None:
                return self.refuse(request, 401, "sign in with a console token (`facefleet console token --role ROLE`)")
            if request.method == "POST":
                form = await request.form()
                request.state.form = form
                if not self._csrf_ok(request, form):
                    log.warning("console_csrf_refused", subject=person.subject, path=request.url.path)
                    return self.refuse(
                        request, 403, "this form is missing its CSRF token or it is stale; reload the page", person
                    )
            if method is not None and not pages.may(person, method):
                log.warning("console_role_refused", subject=person.subject, path=request.url.path, method=method)
                return self.refuse(
                    request,
                    403,
                    f"{request.url.path} needs a role allowed to call {method}; "
                    f"you have {', '.join(sorted(person.roles))}",
                    person,
                )
            try:
                return await handler(request, person)
            except CallFailed as error:
                return self.refuse(request, error.status, error.message, person)

        return endpoint

    def act(self, request: Request, person: Person, where: str, work: Callable[[], str]) -> Awaitable[Response]:
        """Run a state-changing call; flash its outcome and go back to `where` (post/redirect/get)."""

        async def run() -> Response:
            try:
                text = await run_in_threadpool(work)
                request.session["flash"] = {"kind": "ok", "text": text}
                log.info("console_action", subject=person.subject, path=request.url.path, outcome="ok")
            except CallFailed as error:
                if error.status in (401, 403):
                    raise
                request.session["flash"] = {"kind": "error", "text": error.message}
                log.info("console_action", subject=person.subject, path=request.url.path, outcome=error.message)
            return RedirectResponse(where, status_code=303)

        return run()

    # -- pages -----------------------------------------------------------------------------------
    async def home(self, request: Request, person: Person) -> Response:
        first = next((p for p in pages.PAGES if pages.may(person, p.method)), None)
        if first is None:
            return self.refuse(request, 403, "your roles open no console page", person)
        return RedirectResponse(f"/{first.name}", status_code=303)

    def _filters(self, request: Request) -> dict[str, str]:
        return {key: request.query_params.get(key, "") for key in ("project", "state", "pool")}

    async def tasks(self, request: Request, person: Person) -> Response:
        filters = self._filters(request)
        rows = await run_in_threadpool(pages.tasks, self.gateway, person, **filters)
        return self.render(
            request,
            "tasks.html",
            person=person,
            rows=rows,
            filters=filters,
            states=pages.STATE_NAMES,
            page=pages.PAGE["tasks"],
            now=datetime.now(UTC),
        )

    async def task_rows(self, request: Request, person: Person) -> Response:
        rows = await run_in_threadpool(pages.tasks, self.gateway, person, **self._filters(request))
        return self.render(request, "task_rows.html", person=person, rows=rows, now=datetime.now(UTC))

    async def task(self, request: Request, person: Person) -> Response:
        detail = await run_in_threadpool(pages.task_detail, self.gateway, person, request.path_params["task_id"])
        return self.render(request, "task.html", person=person, page=pages.PAGE["tasks"], **detail)

    async def finance(self, request: Request, person: Person) -> Response:
        data = await run_in_threadpool(pages.budgets, self.gateway, person, datetime.now(UTC))
        return self.render(
            request,
            "finance.html",
            person=person,
            page=pages.PAGE["finance"],
            sweep=None,
            parameters=pages.SWEEP_PARAMETERS,
            may_set=pages.may(person, pages.ACTION_METHOD["set_budget"]),
            **data,
        )

    async def set_budget(self, request: Request, person: Person) -> Response:
        form = request.state.form

        def work() -> str:
            budget = pages.set_budget(
                self.gateway,
                person,
                str(form.get("name", "")),
                str(form.get("cap", "")),
                str(form.get("alert_pct", "")),
                str(form.get("reason", "")),
                create=form.get("create") == "yes",
            )
            return f"budget {budget.name}: cap {_money(budget.monthly_cap_usd)}/month, alert at {budget.alert_pct:g}%"

        return await self.act(request, person, "/finance", work)

    async def sweep(self, request: Request, person: Person) -> Response:
        form = request.state.form
        fields = {key: str(form.get(key, "")) for key in ("parameter", "start", "stop", "step")}
        try:
            result = await run_in_threadpool(pages.what_if, self.settings, **fields)
        except CallFailed as error:
            return self.render(
                request, "sweep.html", status=error.status, person=person, sweep=None, error=error.message
            )
        return self.render(
            request, "sweep.html", person=person, sweep=result, chart=charts.sweep_chart(result["rows"]), error=""
        )

    async def compliance(self, request: Request, person: Person) -> Response:
        project = request.query_params.get("proof", "").strip()
        lock_rows = await run_in_threadpool(pages.locks, self.gateway, person)
        audit = await run_in_threadpool(pages.audit_status, self.settings)
        proof = await run_in_threadpool(pages.residency, self.settings, project) if project else None
        return self.render(
            request,
            "compliance.html",
            person=person,
            page=pages.PAGE["compliance"],
            locks=lock_rows,
            audit=audit,
            proof=proof,
            proof_project=project,
            may_lock=pages.may(person, pages.ACTION_METHOD["lock"]),
        )

    async def set_lock(self, request: Request, person: Person) -> Response:
        form = request.state.form
        locked = request.url.path.endswith("/lock")
        project, reason = str(form.get("project", "")), str(form.get("reason", ""))

        def work() -> str:
            result = pages.lock(self.gateway, person, project, reason, locked)
            verb = "locked on-prem" if locked else "unlocked"
            return f"{result.project} {verb} by {result.by} ({result.reason})"

        return await self.act(request, person, "/compliance", work)

    async def fleet(self, request: Request, person: Person) -> Response:
        data = await run_in_threadpool(pages.fleet, self.gateway, person)
        fragment = request.url.path.endswith("/body")
        return self.render(
            request,
            "fleet_body.html" if fragment else "fleet.html",
            person=person,
            page=pages.PAGE["fleet"],
            fleet=data,
            now=datetime.now(UTC),
        )

    async def sign_out(self, request: Request, person: Person) -> Response:
        request.session.clear()
        return self.refuse(request, 401, "signed out")

    def routes(self) -> list[Any]:
        page = pages.PAGE
        act = pages.ACTION_METHOD
        return [
            Route("/", self.guarded(None, self.home)),
            Route("/tasks", self.guarded(page["tasks"].method, self.tasks)),
            Route("/tasks/rows", self.guarded(page["tasks"].method, self.task_rows)),
            Route("/tasks/{task_id}", self.guarded("/facefleet.v1.Scheduler/Explain", self.task)),
            Route("/finance", self.guarded(page["finance"].method, self.finance)),
            Route("/finance/budget", self.guarded(act["set_budget"], self.set_budget), methods=["POST"]),
            Route("/finance/sweep", self.guarded(page["finance"].method, self.sweep), methods=["POST"]),
            Route("/compliance", self.guarded(page["compliance"].method, self.compliance)),
            Route("/compliance/lock", self.guarded(act["lock"], self.set_lock), methods=["POST"]),
            Route("/compliance/unlock", self.guarded(act["unlock"], self.set_lock), methods=["POST"]),
            Route("/fleet", self.guarded(page["fleet"].method, self.fleet)),
            Route("/fleet/body", self.guarded(page["fleet"].method, self.fleet)),
            Route("/signout", self.guarded(None, self.sign_out), methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]


@contextlib.asynccontextmanager
async def _closing(gateway: Gateway) -> AsyncIterator[None]:
    yield
    gateway.close()


def create_app(settings: Settings, gateway: Gateway | None = None) -> Starlette:
    """The ASGI app. Raises FileNotFoundError / CertificateError when the CA or secret is missing."""
    gateway = gateway or Gateway(settings)  # first: no secret file is written without a CA to use
    secret = tokens.load_secret(settings)
    console = Console(settings, gateway, secret)
    session_key = hmac.new(secret, b"facefleet-console-session", hashlib.sha256).hexdigest()
    app = Starlette(
        routes=console.routes(),
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=session_key,
                session_cookie=SESSION_COOKIE,
                max_age=settings.console.token_ttl_s,
                same_site="strict",
                https_only=False,  # served on 127.0.0.1; put TLS in front for anything else
            )
        ],
        lifespan=lambda app: _closing(console.gateway),
    )
    app.state.console = console
    return app
