"""Replay a decoding run's greedy outputs through the drafter and the draft budget: no forwards.

    python bench/draft_replay.py bench/out/decoding.json            # a bench/decoding.py --output-json file
    python bench/draft_replay.py bench/out/decoding.json --fixed 1,2,4,8,16

Greedy decoding is deterministic, so the tokens a request will produce are known from HF
greedy's run in that file. Each prompt is replayed through the engine's own `Speculator` (its
`plan`, with the server's defaults): every step drafts and cuts a tree, the tree's accepted
length is read off the known continuation (exactly what verification would accept), and the
step's model time is priced by the cost ladder the run measured at start-up. That isolates the
drafter and the budget from this machine's noise and from everything but forwards:

- tokens per decode step (hardware independent, for the ladder's choices; the first token,
  from prefill, is not counted),
- modelled speedup = plain decoding's model time (one row per token) / the replay's,

for the adaptive budget and for fixed tree sizes (`--fixed`, every step drafting up to k nodes
regardless of cost), cold (prompt trie only) and warm (the other prompts' outputs of the same
workload in the shared store, as bench/decoding.py's ts_warm). Real speedups also pay prefill,
drafting and the engine's per-step work; bench/decoding.py measures those.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prompts import encode_chat  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trieserve.decoding.draft import DraftConfig  # noqa: E402
from trieserve.decoding.trie import OutputStore  # noqa: E402
from trieserve.server.model import resolve_model_path  # noqa: E402
from trieserve.server.settings import Settings  # noqa: E402
from trieserve.server.speculation import Speculator, StepCost  # noqa: E402


def accepted_length(tree, truth: list[int]) -> int:
    """Draft tokens greedy verification accepts: the longest tree path equal to truth's start."""
    node, n = -1, 0
    while n < len(truth):
        node = next((i for i, p in enumerate(tree.parents) if p == node and tree.tokens[i] == truth[n]), None)
        if node is None:
            break
        n += 1
    return n


def ladder(text: str) -> StepCost:
    pairs = [p.split(":") for p in text.split(", ")]
    return StepCost([int(n) for n, _ in pairs], [float(ms) / 1e3 for _, ms in pairs])


def replay_workload(
    prompts, outputs, cost, settings: Settings, fixed: int | None, warm: bool
) -> tuple[int, int, float]:
    """(decoded tokens, decode steps, modelled seconds) over a workload's prompts, one Speculator throughout
    (its server-wide calibration carries over from prompt to prompt, as in the engine)."""
    config = DraftConfig(settings.lookahead_mode, settings.max_match, settings.branch_length)
    length = settings.decoding_length if fixed is None else fixed
    spec = Speculator(OutputStore(ngram_len=config.ngram_len), config, length, cost, adaptive=fixed is None)
    tokens = steps = 0
    seconds = 0.0
    for i, (ids, out) in enumerate(zip(prompts, outputs, strict=True)):
        spec.store = OutputStore(ngram_len=config.ngram_len)
        if warm:
            for j, other in enumerate(outputs):
                if j != i:
                    spec.store.insert(other)
        # the first token comes from prefill's logits, as in the engine: decode steps start after it
        seq = SimpleNamespace(
            prompt_ids=ids, output_ids=out[:1], state={}, lookahead=True, request=SimpleNamespace(max_tokens=len(out)),
            max_context=1 << 30, logical_len=len(ids) + 1,
        )  # fmt: skip
        spec.admit(seq)
        while len(seq.output_ids) < len(out):
            tree = spec.plan(None, [seq])[0]
            n = accepted_length(tree, out[len(seq.output_ids) :]) + 1
            seq.output_ids += out[len(seq.output_ids) : len(seq.output_ids) + n]
            seq.logical_len += n
            seconds += cost(len(tree) + 1)
            steps += 1
        spec.release(seq)
        tokens += len(out) - 1
    return tokens, steps, seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a bench/decoding.py --output-json file with hf_greedy runs")
    ap.add_argument("--fixed", default="1,2,4,8,16", help="fixed tree sizes to compare (comma-separated)")
    args = ap.parse_args(argv)
    data = json.loads(args.run.read_text())
    settings = Settings()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.model, settings.cache_dir))
    cost = ladder(data["cost_ms"][0])
    greedy = {(r["workload"], r["prompt"]): r["tokens"] for r in data["runs"] if r["method"] == "hf_greedy"}
    arms: list[tuple[str, int | None]] = [("adaptive", None)] + [
        (f"fixed {k}", int(k)) for k in args.fixed.split(",") if k
    ]
    print(f"replay of `{data['command']}`\ncost ladder (ms): {data['cost_ms'][0]}\n")
    print("| workload | trie | " + " | ".join(name for name, _ in arms) + " |")
    print("|---|---|" + "---|" * len(arms))
    for workload, prompts in data["prompts"].items():
        ids = [encode_chat(tokenizer, p["messages"]) for p in prompts]
        outputs = [greedy[(workload, i)] for i in range(len(prompts))]
        for warm in (False, True):
            cells = []
            for _, fixed in arms:
                tokens, steps, seconds = replay_workload(ids, outputs, cost, settings, fixed, warm)
                cells.append(f"{tokens / steps:.2f} tok/step, {tokens * cost(1) / seconds:.2f}x")
            print(f"| {workload} | {'warm' if warm else 'cold'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
