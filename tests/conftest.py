"""Shared fixtures: the real default model, and a real HTTP server in a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# Triton kernels run through the interpreter on machines without a GPU; this must be set
# before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The matmul routes and cost ladders the tests' engines and servers measure (while the suite loads
# the machine) stay out of the user's cache, where a server started after the tests would take them
os.environ.setdefault("TRIESERVE_TUNING_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "tuning"))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from trieserve.server.model import prepare_default_model
    from trieserve.server.settings import Settings

    return prepare_default_model(Settings().cache_dir)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """A plain transformers model (SDPA attention): the reference trieserve must agree with."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def stream_kernel():
    """The C++ few-row matmul kernel (server/stream_linear.cpp), built once per machine. Only a
    machine without a C++ compiler skips the tests that need it; where one exists it must build."""

    from trieserve.server import matmul
    from trieserve.server.settings import Settings

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the stream matmul kernel cannot be built here")
    module = matmul.load_stream(Settings().cache_dir / "ext")
    assert module is not None, "the stream matmul kernel failed to build (see the warning above)"
    return module


@pytest.fixture(scope="session")
def runner(model_dir):
    from trieserve.server.model import load_model
    from trieserve.server.runner import ModelRunner

    model, _ = load_model(model_dir, "float32", "cpu")
    return ModelRunner(model, prefill_chunk=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str) -> float:
    """The value of an unlabelled metric in the server's /metrics."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")


def trieserve_command() -> str:
    """The `trieserve` console script of this interpreter's environment (as a user starts it;
    `python -m` from the checkout would put the checkout's top-level folders on sys.path)."""
    script = Path(sys.executable).parent / "trieserve"
    found = str(script) if script.is_file() else shutil.which("trieserve")
    assert found, "the trieserve command is not installed (make install)"
    return found


class LiveServer:
    """`trieserve serve` in a subprocess, exactly as a user starts it."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            trieserve_command(),
            "serve",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *args,
        ]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"trieserve-test-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server(model_dir):
    srv = LiveServer().wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
