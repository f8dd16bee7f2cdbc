"""The trust authority on the network: a Starlette app served by uvicorn, and its clients.

Design: the HTTP API is a thin JSON layer over :class:`TrustAuthority`'s
handlers, so the in-process transport (for unit tests and the kernel's
default) and the HTTP transport exchange the very same messages.

    GET  /v1/ca        the CA certificate (PEM) that signs results and identities
    POST /v1/request   {"workload"} -> {"workload", "nonce", "expires_ns"}
    POST /v1/evidence  evidence JSON -> {"result", "signature", "release"?}
    GET  /v1/health    liveness

:class:`ServerThread` runs uvicorn on a loopback socket it binds itself (port 0
gives an ephemeral port) and stops it on request, for tests and for a kernel
that is configured to serve its authority.  ``vmkernel trust-authority serve``
runs the same app in the foreground.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any, Protocol

import httpx
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from vmkernel.errors import InvalidArgument, TrustAuthorityError

from .authority import Challenge, Evidence, Outcome, TrustAuthority

__all__ = [
    "HttpTransport",
    "InProcessTransport",
    "ServerThread",
    "Transport",
    "bind_socket",
    "create_app",
    "serve",
]

_MAX_BODY = 64 * 1024


class Transport(Protocol):
    """How a host reaches a trust authority."""

    endpoint: str

    def request(self, workload: str) -> Challenge: ...

    def submit(self, evidence: Evidence) -> Outcome: ...

    def ca_certificate(self) -> x509.Certificate: ...


class InProcessTransport:
    """Calls the authority's handlers directly, with the messages serialised as on the wire."""

    def __init__(self, authority: TrustAuthority) -> None:
        self.authority = authority
        self.endpoint = "in-process"

    def request(self, workload: str) -> Challenge:
        reply = json.loads(json.dumps(self.authority.handle_request({"workload": workload})))
        return Challenge.from_json(reply)

    def submit(self, evidence: Evidence) -> Outcome:
        msg = json.loads(json.dumps(evidence.to_json()))
        return Outcome.from_json(json.loads(json.dumps(self.authority.handle_evidence(msg))))

    def ca_certificate(self) -> x509.Certificate:
        return self.authority.ca_certificate


class HttpTransport:
    """Talks to a trust authority over HTTP.  Every request has a timeout; nothing retries silently."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self.endpoint = url.rstrip("/")
        # Requests go out as header and body writes; without TCP_NODELAY each waits for a delayed ACK.
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._client = httpx.Client(base_url=self.endpoint, timeout=timeout_s, transport=transport)
        self._ca: x509.Certificate | None = None

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise TrustAuthorityError(
                self.endpoint, f"{method} {path} failed: {exc!r}", "a reachable service"
            ) from exc
        if response.status_code != 200:
            raise TrustAuthorityError(
                self.endpoint,
                f"{method} {path} answered {response.status_code}: {response.text[:200]}",
                "200",
            )
        return response

    def request(self, workload: str) -> Challenge:
        return Challenge.from_json(self._call("POST", "/v1/request", {"workload": workload}).json())

    def submit(self, evidence: Evidence) -> Outcome:
        return Outcome.from_json(self._call("POST", "/v1/evidence", evidence.to_json()).json())

    def ca_certificate(self) -> x509.Certificate:
        """The authority's CA, fetched once per transport (trusted on first use)."""
        if self._ca is None:
            self._ca = x509.load_pem_x509_certificate(self._call("GET", "/v1/ca").content)
        return self._ca


def create_app(authority: TrustAuthority) -> Starlette:
    """The ASGI application serving ``authority``."""

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > _MAX_BODY:
            raise InvalidArgument("request body", f"{len(raw)} bytes", f"at most {_MAX_BODY} bytes")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument("request body", raw[:40], "a JSON object") from exc
        if not isinstance(data, dict):
            raise InvalidArgument("request body", type(data).__name__, "a JSON object")
        return data

    async def ca(request: Request) -> Response:
        pem = authority.ca_certificate.public_bytes(serialization.Encoding.PEM)
        return PlainTextResponse(pem.decode("ascii"), media_type="application/x-pem-file")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def do_request(request: Request) -> Response:
        try:
            return JSONResponse(authority.handle_request(await body_of(request)))
        except InvalidArgument as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    async def do_evidence(request: Request) -> Response:
        try:
            return JSONResponse(authority.handle_evidence(await body_of(request)))
        except InvalidArgument as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    return Starlette(
        routes=[
            Route("/v1/ca", ca, methods=["GET"]),
            Route("/v1/health", health, methods=["GET"]),
            Route("/v1/request", do_request, methods=["POST"]),
            Route("/v1/evidence", do_evidence, methods=["POST"]),
        ]
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for the app.

    TCP_NODELAY is set on the listening socket so that accepted connections
    inherit it: the server writes a response's headers and body separately,
    and without it the body waits for the client's delayed ACK (~40 ms).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TrustAuthorityError(f"{host}:{port}", f"cannot bind: {exc}", "a free local address") from exc
    return sock


def serve(authority: TrustAuthority, host: str, port: int) -> None:
    """Serve ``authority`` in the foreground until interrupted (``vmkernel trust-authority serve``)."""
    sock = bind_socket(host, port)
    config = uvicorn.Config(create_app(authority), log_level="info", lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """uvicorn serving the authority on a background thread, bound to a loopback socket."""

    def __init__(self, authority: TrustAuthority, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = bind_socket(host, port)
        bound_host, bound_port = self._sock.getsockname()[:2]
        self.url = f"http://{bound_host}:{bound_port}"
        config = uvicorn.Config(create_app(authority), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"trust-authority {self.url}", daemon=True)

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        self._thread.start()
        waited = threading.Event()
        for _ in range(int(timeout_s / 0.01)):
            if self._server.started:
                return self
            if not self._thread.is_alive():
                break
            waited.wait(0.01)
        self.stop()
        raise TrustAuthorityError(self.url, "the server did not start", f"startup within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
