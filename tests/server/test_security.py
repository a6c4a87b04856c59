"""API keys, body size limit and request timeout on a real server."""

import json
import socket
import time

import httpx
import openai
import pytest

from tests.conftest import LiveServer


@pytest.fixture(scope="module")
def locked(model_dir, tmp_path_factory):
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text("# team keys\nsecond-key\n")
    srv = LiveServer(
        "--api-key",
        "first-key",
        "--api-key-file",
        str(keyfile),
        "--max-body-bytes",
        "4096",
        "--request-timeout-s",
        "2",
        "--no-lookahead",
    ).wait_ready()
    yield srv
    srv.stop()


def test_keys_protect_v1_and_metrics_but_not_health(locked):
    assert httpx.get(locked.url + "/health").status_code == 200
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(locked.url + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(locked.url + path, headers={"Authorization": "Bearer nope"}).status_code == 401
    for key in ("first-key", "second-key"):
        assert httpx.get(locked.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_sdk_with_and_without_key(locked):
    good = openai.OpenAI(base_url=locked.url + "/v1", api_key="first-key", max_retries=0)
    resp = good.completions.create(model="SmolLM2-135M-Instruct", prompt="Hello", max_tokens=2, temperature=0)
    assert resp.usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=locked.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_large_body_gets_413(locked):
    r = httpx.post(
        locked.url + "/v1/completions", json={"prompt": "x" * 10_000}, headers={"Authorization": "Bearer first-key"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_chunked_bodies_are_size_checked_and_replayed(locked):
    """A body sent without Content-Length is read to check its size, then handed to the route."""
    auth = {"Authorization": "Bearer first-key", "content-type": "application/json"}

    def chunked(data: bytes):
        yield from (data[i : i + 1000] for i in range(0, len(data), 1000))

    big = json.dumps({"prompt": "x" * 10_000}).encode()
    r = httpx.post(locked.url + "/v1/completions", content=chunked(big), headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # a Content-Length that understates a chunked body (which the server decodes anyway) is no
    # way around the limit; raw HTTP, since clients refuse to send such a request
    host, port = locked.url.removeprefix("http://").split(":")
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunked(big)) + b"0\r\n\r\n"
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer first-key\r\n"
        "Content-Type: application/json\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + chunks)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"413" and b"request_too_large" in reply, reply[:300]
    small = json.dumps({"prompt": "Hello there", "max_tokens": 2, "temperature": 0}).encode()
    r = httpx.post(locked.url + "/v1/completions", content=chunked(small), headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_client_leaving_mid_upload_is_counted_as_499(locked):
    def left() -> float:
        text = httpx.get(locked.url + "/metrics", headers={"Authorization": "Bearer first-key"}).text
        lines = [
            ln
            for ln in text.splitlines()
            if ln.startswith('trieserve_requests_total{endpoint="/v1/completions",status="499"}')
        ]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = left()
    host, port = locked.url.removeprefix("http://").split(":")
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer first-key\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b'5\r\n{"pro\r\n')  # then leave before the rest
    deadline = time.monotonic() + 10
    while left() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left() == before + 1


def test_request_timeout_cancels(locked):
    body = {"prompt": "Tell me everything.", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    r = httpx.post(locked.url + "/v1/completions", json=body, headers={"Authorization": "Bearer first-key"}, timeout=60)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    # the cancelled sequence is gone: the next request is served promptly
    r = httpx.post(
        locked.url + "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 2, "temperature": 0},
        headers={"Authorization": "Bearer first-key"},
        timeout=60,
    )
    assert r.status_code == 200
