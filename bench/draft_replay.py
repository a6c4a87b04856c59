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

`--oracle` adds an upper bound for any drafter that copies from the context: at every step an
oracle that knows the continuation picks, among all positions of the context (prompt and output
so far) that follow an occurrence of the last token, the one whose text agrees with the
continuation longest, and drafts exactly that chain (at most `--branch-length` tokens, no
wasted rows): tokens per step, and the modelled speedup with each step priced at its chain's
rows on the run's ladder. A trie drafter matching context suffixes cannot accept more per step
than this chain without drafting deeper; with larger trees it can only approach it. It is a bound
for cold tries only (a warm store holds other prompts' outputs, which the oracle does not see), so
it is printed on the cold rows; its speedup is a bound where a step of n rows costs no less per
row than a longer one (cost(n) / n non-increasing, as on every measured ladder).

`--by-match` adds a table of how often the best depth-1 node of a 64-node tree (cold trie) is the
continuation, by how many context tokens its branch was found on (`DraftTree.matched`) and by the
drafter's estimate: the evidence for keying the budget's calibration on the match length.
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
from trieserve.server.budget import StepCost  # noqa: E402
from trieserve.server.model import resolve_model_path  # noqa: E402
from trieserve.server.settings import Settings  # noqa: E402
from trieserve.server.speculation import Speculator  # noqa: E402


def accepted_length(tree, truth: list[int]) -> int:
    """Draft tokens greedy verification accepts: the longest tree path equal to truth's start."""
    node, n = -1, 0
    while n < len(truth):
        node = next((i for i, p in enumerate(tree.parents) if p == node and tree.tokens[i] == truth[n]), None)
        if node is None:
            break
        n += 1
    return n


def oracle_chain(context: list[int], truth: list[int]) -> int:
    """Longest prefix of `truth` that the context holds right after an occurrence of its last
    token (the best single chain a context-copying drafter could propose)."""
    last, n, best = context[-1], len(context), 0
    for start in range(1, n):
        if context[start - 1] != last:
            continue
        length = 0
        while length < len(truth) and start + length < n and context[start + length] == truth[length]:
            length += 1
        best = max(best, length)
    return best


def replay_oracle(prompts, outputs, cost, depth: int) -> tuple[int, int, float]:
    """(decoded tokens, decode steps, modelled seconds) of the oracle chain (module docstring)."""
    tokens = steps = 0
    seconds = 0.0
    for ids, out in zip(prompts, outputs, strict=True):
        done = 1  # the first token comes from prefill
        while done < len(out):
            # like the engine, draft no more than the tokens left after this step's bonus token
            n = oracle_chain(list(ids) + out[:done], out[done : min(done + depth, len(out) - 1)]) + 1
            seconds += cost(n)
            done += n
            steps += 1
        tokens += len(out) - 1
    return tokens, steps, seconds


def ladder(text: str) -> StepCost:
    pairs = [p.split(":") for p in text.split(", ")]
    return StepCost([int(n) for n, _ in pairs], [float(ms) / 1e3 for _, ms in pairs])


def replay_workload(
    prompts, outputs, cost, settings: Settings, fixed: int | None, warm: bool, on_step=None
) -> tuple[int, int, float]:
    """(decoded tokens, decode steps, modelled seconds) over a workload's prompts, one Speculator throughout
    (its server-wide calibration carries over from prompt to prompt, as in the engine).
    `on_step(tree, truth)`, when given, sees every step's tree and the tokens that follow."""
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
            if on_step is not None:
                on_step(tree, out[len(seq.output_ids) :])
            n = accepted_length(tree, out[len(seq.output_ids) :]) + 1
            seq.output_ids += out[len(seq.output_ids) : len(seq.output_ids) + n]
            seq.logical_len += n
            seconds += cost(len(tree) + 1)
            steps += 1
        spec.release(seq)
        tokens += len(out) - 1
    return tokens, steps, seconds


ESTIMATES = ((0.0, "< 0.5"), (0.5, "0.5-0.9"), (0.9, ">= 0.9"))


def hits_by_match(prompts, outputs, cost, settings: Settings) -> dict[tuple[int, str], list[int]]:
    """{(match length, estimate bucket): [hits, steps]} of the best depth-1 node, cold trie, fixed
    64-node trees (module docstring)."""
    table: dict[tuple[int, str], list[int]] = {}

    def tally(tree, truth: list[int]) -> None:
        if not len(tree) or tree.matched is None:
            return
        best = next(i for i in tree.ranked() if tree.parents[i] < 0)
        bucket = [name for edge, name in ESTIMATES if tree.probs[best] >= edge][-1]
        cell = table.setdefault((tree.matched[best], bucket), [0, 0])
        cell[0] += tree.tokens[best] == truth[0]
        cell[1] += 1

    replay_workload(prompts, outputs, cost, settings, 64, False, on_step=tally)
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a bench/decoding.py --output-json file with hf_greedy runs")
    ap.add_argument("--fixed", default="1,2,4,8,16", help="fixed tree sizes to compare (comma-separated)")
    ap.add_argument("--oracle", action="store_true", help="add the oracle chain's bound (module docstring)")
    ap.add_argument("--branch-length", type=int, default=Settings().branch_length, help="the oracle's depth cap")
    ap.add_argument("--by-match", action="store_true", help="add the hit rates by match length (module docstring)")
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
    header = [name for name, _ in arms] + ([f"oracle chain (depth {args.branch_length})"] if args.oracle else [])
    print("| workload | trie | " + " | ".join(header) + " |")
    print("|---|---|" + "---|" * len(header))
    by_match: dict[str, dict] = {}
    for workload, prompts in data["prompts"].items():
        ids = [encode_chat(tokenizer, p["messages"]) for p in prompts]
        outputs = [greedy[(workload, i)] for i in range(len(prompts))]
        for warm in (False, True):
            cells = []
            for _, fixed in arms:
                tokens, steps, seconds = replay_workload(ids, outputs, cost, settings, fixed, warm)
                cells.append(f"{tokens / steps:.2f} tok/step, {tokens * cost(1) / seconds:.2f}x")
            if args.oracle and warm:  # the store's other outputs are outside the oracle's context
                cells.append("- (cold only)")
            elif args.oracle:
                tokens, steps, seconds = replay_oracle(ids, outputs, cost, args.branch_length)
                cells.append(f"{tokens / steps:.2f} tok/step, {tokens * cost(1) / seconds:.2f}x")
            print(f"| {workload} | {'warm' if warm else 'cold'} | " + " | ".join(cells) + " |", flush=True)
        if args.by_match:
            by_match[workload] = hits_by_match(ids, outputs, cost, settings)
    if args.by_match:
        print("\nbest depth-1 node of a 64-node tree (cold): continuation hit rate (hits / steps)\n")
        print("| workload | matched on | " + " | ".join(f"estimate {name}" for _, name in ESTIMATES) + " |")
        print("|---|---|" + "---|" * len(ESTIMATES))
        for workload, table in by_match.items():
            for k in sorted({k for k, _ in table}):
                cells = []
                for _, name in ESTIMATES:
                    hits, n = table.get((k, name), (0, 0))
                    cells.append(f"{hits / n:.2f} ({hits}/{n})" if n else "-")
                print(f"| {workload} | {k} token{'s' if k > 1 else ''} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
