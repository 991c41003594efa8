"""A loopback model server for tests: speaks the OpenAI chat-completions and the Anthropic
messages wire protocols on 127.0.0.1 and answers from a script of replies."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"

_OPENAI_ERRORS = {400: "invalid_request_error", 401: "invalid_api_key",
                  429: "rate_limit_exceeded", 500: "server_error"}
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                     429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a model turn, or an HTTP error, optionally after a delay."""

    text: str = ""
    tool_calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    tokens_in: int = 10
    tokens_out: int = 5
    status: int = 200
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    @classmethod
    def turn(cls, text: str = "", *, calls: list[tuple[str, dict[str, Any]]] | None = None,
             tokens_in: int = 10, tokens_out: int = 5) -> Reply:
        """A normal assistant turn: text and/or tool calls ``(name, arguments)``."""
        return cls(text=text, tool_calls=tuple(calls or ()), tokens_in=tokens_in,
                   tokens_out=tokens_out)

    @classmethod
    def error(cls, status: int, message: str = "", **headers: str) -> Reply:
        """An HTTP error with the provider's error body; headers as ``retry_after_ms="10"``."""
        return cls(status=status, message=message or f"loopback error {status}",
                   headers={k.replace("_", "-"): v for k, v in headers.items()})

    @classmethod
    def rate_limited(cls) -> Reply:
        """A 429 that asks for an almost immediate retry."""
        return cls.error(429, "rate limit reached", retry_after_ms="10", retry_after="0")

    @classmethod
    def slow(cls, seconds: float, then: Reply | None = None) -> Reply:
        """``then`` (a plain turn by default), answered only after ``seconds``."""
        return replace(then or cls.turn("late"), delay=seconds)


@dataclass(frozen=True)
class Seen:
    """A request the server received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def bearer(self) -> str:
        """The token of an ``Authorization: Bearer`` header, or ""."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme == "Bearer" else ""


class Loopback:
    """A threaded HTTP server on 127.0.0.1 answering model calls from ``script``."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def base_url(self, provider: str) -> str:
        """What each SDK takes as base_url: OpenAI's includes /v1, Anthropic's does not."""
        return f"{self.url}/v1" if provider == "openai" else self.url

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def __enter__(self) -> Loopback:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def _next(self, seen: Seen) -> tuple[int, Reply]:
        with self._lock:
            self.requests.append(seen)
            seq = len(self.requests)
            if self._replies:
                return seq, self._replies.popleft()
        return seq, Reply.error(500, "the loopback server has no scripted reply left")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        loopback = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                headers = {k.lower(): v for k, v in self.headers.items()}
                seq, reply = loopback._next(Seen(self.path, headers, body))
                if reply.delay and loopback._closing.wait(reply.delay):
                    self.close_connection = True
                    return
                if self.path == OPENAI_PATH:
                    payload = _openai(reply, body, seq)
                elif self.path == ANTHROPIC_PATH:
                    payload = _anthropic(reply, body, seq)
                else:
                    reply, payload = Reply(status=404), {"error": f"no route {self.path}"}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def _openai(reply: Reply, request: dict[str, Any], seq: int) -> dict[str, Any]:
    if reply.status != 200:
        kind = _OPENAI_ERRORS.get(reply.status, "server_error")
        return {"error": {"message": reply.message, "type": kind, "param": None, "code": kind}}
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{seq}_{i}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args)}}
            for i, (name, args) in enumerate(reply.tool_calls)
        ]
    return {
        "id": f"chatcmpl-{seq}", "object": "chat.completion", "created": int(time.time()),
        "model": request.get("model", ""),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls" if reply.tool_calls else "stop"}],
        "usage": {"prompt_tokens": reply.tokens_in, "completion_tokens": reply.tokens_out,
                  "total_tokens": reply.tokens_in + reply.tokens_out},
    }


def _anthropic(reply: Reply, request: dict[str, Any], seq: int) -> dict[str, Any]:
    if reply.status != 200:
        kind = _ANTHROPIC_ERRORS.get(reply.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": reply.message}}
    content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
    content += [{"type": "tool_use", "id": f"toolu_{seq}_{i}", "name": name, "input": args}
                for i, (name, args) in enumerate(reply.tool_calls)]
    return {
        "id": f"msg_{seq}", "type": "message", "role": "assistant",
        "model": request.get("model", ""), "content": content,
        "stop_reason": "tool_use" if reply.tool_calls else "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": reply.tokens_in, "output_tokens": reply.tokens_out},
    }
