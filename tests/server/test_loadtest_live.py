"""The load-test command against a live trieserve: the report must add up."""

import json

from trieserve.server.loadtest import main as loadtest


def test_loadtest_report_is_consistent(server, tmp_path):
    out = tmp_path / "report.json"
    rc = loadtest(
        [
            "--base-url",
            server.url,
            "--dataset",
            "copy",
            "--num-prompts",
            "4",
            "--num-warmup",
            "0",
            "--concurrency",
            "2",
            "--max-tokens",
            "8",
            "--input-len",
            "96",
            "--output-json",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["completed"] + run["failed"] + run["rejected_429"] == 4
    assert run["completed"] == 4 and run["requests_without_usage"] == 0
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert 0 <= run[f"median_{metric}_ms"] <= run[f"p90_{metric}_ms"] <= run[f"p99_{metric}_ms"]
    assert run["mean_ttft_ms"] <= run["mean_e2el_ms"]
    # output tokens come from `usage`, and the server's own counters saw exactly the same tokens
    assert run["total_output_tokens"] == run["generation_tokens"] > 0
    assert abs(run["output_throughput"] - run["total_output_tokens"] / run["duration"]) < 1e-6
    assert run["tokens_per_forward"] >= 1.0
