"""Server-path overhead: plain greedy through the HTTP server against HF `generate` on the same ids.

    python bench/overhead.py                     # 8 requests, 128 new tokens each
    python bench/overhead.py --requests 4 --max-tokens 64

Starts `trieserve serve --no-lookahead` on a free port (the same Python), waits for /health, then
for each prompt sends one chat request with the official `openai` SDK (temperature 0,
`lookahead: false`) and runs HF `model.generate` greedy on the same token ids in this process,
alternating which goes first. Only one of the two runs at a time (the server is idle while HF
runs). Reports tokens/s of both and their ratio: what the HTTP layer, the engine loop, the
tokenizer and streaming of text cost over a bare `generate` call. Prompts are half rag_qa (long
documentation passages) and half open_ended (short) from bench/prompts.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import openai
import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import build_workload, encode_chat  # noqa: E402
from trieserve.server.model import resolve_model_path  # noqa: E402
from trieserve.server.settings import Settings  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log_path: Path) -> subprocess.Popen:
    # the console script, not `python -m`: run from the checkout, that would put its top-level
    # kernels/ folder on sys.path ahead of the `kernels` package transformers imports
    script = Path(sys.executable).parent / "trieserve"
    cmd = [str(script) if script.is_file() else "trieserve", "serve", "--no-lookahead"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log = log_path.open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy after {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def prompts_for(n: int, seed: int) -> list:
    """Half rag_qa, half open_ended, interleaved."""
    rag = build_workload("rag_qa", (n + 1) // 2, seed)
    open_ended = build_workload("open_ended", n // 2, seed)
    out = []
    for i in range(max(len(rag), len(open_ended))):
        out += rag[i : i + 1] + open_ended[i : i + 1]
    return out[:n]


def via_server(
    client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int
) -> tuple[int, float, str, dict]:
    """(completion tokens, seconds, text, stats) of one non-streaming chat request."""
    start = time.perf_counter()
    resp = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, extra_body={"lookahead": False}
    )
    seconds = time.perf_counter() - start
    stats = (resp.model_extra or {}).get("stats") or {}
    return resp.usage.completion_tokens, seconds, resp.choices[0].message.content or "", stats


@torch.inference_mode()
def via_hf(model, ids: list[int], max_tokens: int) -> tuple[list[int], float]:
    x = torch.tensor([ids])
    start = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(ids) :].tolist(), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8, help="chat requests (default 8)")
    p.add_argument("--max-tokens", type=int, default=128, help="max new tokens per request (default 128)")
    p.add_argument("--seed", type=int, default=0, help="prompt choice")
    args = p.parse_args(argv)
    command = shlex.join(["python", "bench/overhead.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.now(timezone.utc)
    settings = Settings()
    model_dir = resolve_model_path(settings.model, settings.cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = prompts_for(args.requests, args.seed)

    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="trieserve-overhead-", suffix=".log")[1])
    proc = start_server(port, log_path)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, log_path)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        warm = prompts[0]
        via_server(client, model, warm.messages, 8)  # first-call costs, not measured
        via_hf(hf, encode_chat(tokenizer, warm.messages), 8)
        load_start = os.getloadavg()
        for i, prompt in enumerate(prompts):
            ids = encode_chat(tokenizer, prompt.messages)
            order = ("server", "hf") if i % 2 == 0 else ("hf", "server")
            for which in order:
                if which == "server":
                    n_srv, s_srv, text, stats = via_server(client, model, prompt.messages, args.max_tokens)
                else:
                    hf_ids, s_hf = via_hf(hf, ids, args.max_tokens)
            same = text == tokenizer.decode(hf_ids, skip_special_tokens=True)
            engine_s = stats.get("prefill_s", 0.0) + stats.get("decode_s", 0.0)
            rows.append((prompt.workload, len(ids), n_srv, s_srv, engine_s, len(hf_ids), s_hf, same))
            print(
                f"[{time.strftime('%H:%M:%S')}] #{i} {prompt.workload} [{len(ids)} tok] server {n_srv} tok "
                f"{s_srv:.2f}s (engine {engine_s:.2f}s) | HF {len(hf_ids)} tok {s_hf:.2f}s | same text: {same}",
                file=sys.stderr,
                flush=True,
            )
        load_end = os.getloadavg()
    finally:
        stop_server(proc)

    srv_tok, srv_s = sum(r[2] for r in rows), sum(r[3] for r in rows)
    eng_s = sum(r[4] for r in rows)
    hf_tok, hf_s = sum(r[5] for r in rows), sum(r[6] for r in rows)
    srv_rate, hf_rate = srv_tok / srv_s, hf_tok / hf_s
    model_name = Path(model_dir).name
    lines = [
        "# trieserve server-path overhead",
        "",
        f"- command: `{command}`",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end",
        f"- model: {model_name}, fp32; {len(rows)} chat requests, max_tokens {args.max_tokens}, greedy, lookahead off",
        "",
        "| path | requests | tokens | seconds | tokens/s | vs HF generate |",
        "|---|---:|---:|---:|---:|---:|",
        f"| HF `model.generate` greedy (in process) | {len(rows)} | {hf_tok} | {hf_s:.1f} | {hf_rate:.1f} | 1.00x |",
        f"| trieserve HTTP (`openai` SDK, non-streaming) | {len(rows)} | {srv_tok} | {srv_s:.1f} | {srv_rate:.1f} | "
        f"{srv_rate / hf_rate:.2f}x |",
        f"| of which engine time (stats prefill_s + decode_s) | | | {eng_s:.1f} | {srv_tok / eng_s:.1f} | "
        f"{srv_tok / eng_s / hf_rate:.2f}x |",
        "",
        f"Same text as HF greedy on {sum(r[7] for r in rows)}/{len(rows)} requests; "
        f"HTTP + tokenizer + queue time outside the engine: {srv_s - eng_s:.2f} s in all "
        f"({(srv_s - eng_s) / len(rows) * 1e3:.0f} ms per request).",
    ]
    print("\n".join(lines))
    log_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
