"""The CPU image's command, run outside Docker: the Dockerfile's ENTRYPOINT + CMD with its ENV.

Only what cannot exist outside the image is changed: a free port on 127.0.0.1, the trie file in a
temporary folder, this interpreter's bin folder on PATH instead of /opt/venv/bin, and, unless the
image's own cache folder exists (inside the container), the user's default cache folder (the
model conversion takes ~30 s; `trieserve prepare-model` does it once).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.deploy_support import Dockerfile

pytestmark = pytest.mark.model

STARTUP_TIMEOUT_S = 180  # the image allows the same (HEALTHCHECK --start-period); a busy CI box needs it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_env(df: Dockerfile, port: int, scratch: Path) -> dict[str, str]:
    host_path = os.environ.get("PATH", "")
    image_env = df.final.env({"PATH": host_path})
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIESERVE_")}
    env.update(image_env)
    image_bin = image_env["PATH"].split(os.pathsep)[0]
    if not Path(image_bin).is_dir():
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), host_path])
    env["TRIESERVE_HOST"] = "127.0.0.1"
    env["TRIESERVE_PORT"] = str(port)
    if not Path(image_env["TRIESERVE_CACHE_DIR"]).is_dir():
        del env["TRIESERVE_CACHE_DIR"]
    trie = Path(image_env["TRIESERVE_TRIE_PATH"])
    if not (trie.parent.is_dir() and os.access(trie.parent, os.W_OK)):
        (scratch / "trie").mkdir(parents=True, exist_ok=True)
        env["TRIESERVE_TRIE_PATH"] = str(scratch / "trie" / trie.name)
    return env


@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    env: dict[str, str]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def wait_healthy(served: Served) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            pytest.fail(f"server exited with {served.proc.returncode} before /health was 200:\n{served.log_tail()}")
        try:
            status = httpx.get(f"{served.url}/health", timeout=5).status_code
        except httpx.HTTPError:
            status = None
        if status == 200:
            return
        assert status in (None, 503), f"/health answered {status} while starting:\n{served.log_tail()}"
        time.sleep(0.5)
    pytest.fail(f"/health not 200 after {STARTUP_TIMEOUT_S} s (last: {status}):\n{served.log_tail()}")


@pytest.fixture(scope="module")
def served(cpu_dockerfile: Dockerfile, tmp_path_factory) -> Served:
    scratch = tmp_path_factory.mktemp("entrypoint")
    port = free_port()
    env = container_env(cpu_dockerfile, port, scratch)
    command = cpu_dockerfile.command()
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable, f"{command[0]!r} (the image's ENTRYPOINT) is not installed here: pip install -e ."
    log = scratch / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([executable, *command[1:]], env=env, cwd=scratch, stdout=out, stderr=subprocess.STDOUT)
    served = Served(proc, port, env, log)
    try:
        wait_healthy(served)
        yield served
    finally:
        served.stop()


def test_serves_a_chat_completion(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].message.content.strip()
    assert 1 <= reply.usage.completion_tokens <= 8
    metrics = httpx.get(f"{served.url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "trieserve_requests_total" in metrics.text


def test_image_healthcheck_probe_passes(served, cpu_dockerfile: Dockerfile):
    probe = cpu_dockerfile.healthcheck()
    executable = shutil.which(probe[0], path=served.env["PATH"])
    proc = subprocess.run([executable, *probe[1:]], env=served.env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_sigterm_stops_cleanly_and_the_probe_then_fails(served, cpu_dockerfile: Dockerfile):
    rc = served.stop()
    assert rc in (0, -signal.SIGTERM), f"exit status {rc} on SIGTERM:\n{served.log_tail()}"
    probe = cpu_dockerfile.healthcheck()
    executable = shutil.which(probe[0], path=served.env["PATH"])
    proc = subprocess.run([executable, *probe[1:]], env=served.env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0, "the HEALTHCHECK probe must fail when nothing serves"
