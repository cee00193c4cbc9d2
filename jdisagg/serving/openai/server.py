"""Uvicorn serving the OpenAI app from a background thread, next to the gRPC server, on the same engine.

Like the gRPC server it listens *before* the engine is built: the port is bound at once (a taken port fails
before minutes of compiling), and ``/health`` answers 503 until ``serve`` attaches the engine.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from jdisagg.chat_template import ChatTemplate
from jdisagg.engine import Engine
from jdisagg.serving.openai.app import ServingState, create_app
from jdisagg.serving.openai.defaults import GenerationDefaults

log = logging.getLogger("jdisagg.serving")

_START_TIMEOUT_S = 30.0


class HTTPServer:
    """The OpenAI-compatible API on ``host:port`` (0: a free port, see ``port``)."""

    def __init__(self, host: str, port: int, model_name: str, chat_template: ChatTemplate | None,
                 defaults: GenerationDefaults | None = None) -> None:
        self.state = ServingState(model_name, chat_template, defaults or GenerationDefaults())
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise OSError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from exc
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(create_app(self.state), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise OSError(f"the HTTP server on {host}:{self.port} did not start")

    def serve(self, engine: Engine) -> None:
        """Take requests on ``engine``; /health turns 200."""
        self.state.engine = engine

    def close(self) -> None:
        """Refuse new requests (503) while the engine drains those in flight."""
        self.state.closing = True

    def shutdown(self) -> None:
        """Stop listening and end open connections (call after the engine drained)."""
        self.state.closing = True
        self._server.should_exit = True
        self._thread.join(timeout=15.0)
        self._socket.close()
