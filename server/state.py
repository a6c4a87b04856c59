"""What the HTTP layer holds: settings, metrics, and the engine once the model is loaded."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from trieserve.server.errors import ModelNotReadyError
from trieserve.server.metrics import Metrics
from trieserve.server.settings import Settings

log = logging.getLogger(__name__)


class ServerState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.engine = None
        self.tokenizer = None
        self.load_error: str | None = None
        self.started = int(time.time())
        self.model_name = settings.served_model_name or (
            Path(settings.model).name if settings.model else "SmolLM2-135M-Instruct"
        )
        self.model_names = {self.model_name}
        self.vocab_size = 0
        self.max_context = 0
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="trieserve-tokenize")

    @asynccontextmanager
    async def lifespan(self, app):
        task = asyncio.create_task(asyncio.to_thread(self.load))
        try:
            yield
        finally:
            if self.engine is not None:
                await asyncio.to_thread(self.engine.stop, self.settings.shutdown_grace_s)
            task.cancel()
            self._tokenize.shutdown(wait=False)

    def begin_shutdown(self) -> None:
        """The shutdown signal arrived: drain the engine now, in the background, while the HTTP
        server still holds its connections (it waits up to the grace plus 5 s for them), so
        requests that outlast the grace end with finish_reason "cancelled" instead of a cut
        connection. The lifespan's `engine.stop` then only joins and saves."""
        engine = self.engine
        if engine is not None:
            threading.Thread(
                target=engine.drain, args=(self.settings.shutdown_grace_s,), name="trieserve-drain", daemon=True
            ).start()

    def load(self) -> None:
        """Load the model and start the engine (runs in a thread; /health says 503 until done)."""
        from trieserve.server.builder import build_engine

        try:
            engine, tokenizer = build_engine(self.settings, self.metrics)
        except Exception as exc:
            self.load_error = f"model load failed: {exc}"
            log.exception("model load failed")
            return
        self.tokenizer = tokenizer
        self.vocab_size = engine.runner.vocab_size
        self.max_context = engine.runner.max_context
        if self.settings.served_model_name is None and self.settings.model is None:
            self.model_names.add("default")
        self.engine = engine
        log.info("model ready: %s", self.model_name)

    def require_engine(self):
        if self.engine is None:
            raise ModelNotReadyError(self.load_error or "the model is still loading; retry shortly")
        return self.engine

    async def encode_off_loop(self, fn, *args) -> list[int]:
        """`fn(*args)` (encode, encode_chat) on the tokenizer's own thread: a prompt of megabytes
        takes seconds to tokenize, which on the event loop would stall every stream and /health.
        One thread, so encodes never run concurrently on the shared tokenizer."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, fn, *args)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)
