"""A model that fails to load leaves the server up, /health at 503 with the reason, and every
generation request answered 503 (not a hang, not a 500)."""

import time

import httpx

from tests.conftest import LiveServer


def test_failed_model_load_reports_503_with_the_reason(tmp_path):
    missing = tmp_path / "no-such-model"
    srv = LiveServer("--model", str(missing))
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline:
            assert srv.proc.poll() is None, srv.output()
            try:
                health = httpx.get(srv.url + "/health", timeout=2)
            except httpx.HTTPError:
                health = None
            if health is not None and "failed" in health.json().get("reason", ""):
                break
            time.sleep(0.2)
        assert health is not None and health.status_code == 503, srv.output()
        reason = health.json()["reason"]
        assert reason.startswith("model load failed") and "no-such-model" in reason, reason

        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "model_not_ready" and "no-such-model" in error["message"]
        assert httpx.get(srv.url + "/v1/models").status_code == 200  # the server itself is fine
    finally:
        srv.stop()
