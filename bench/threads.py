"""What a second thread running torch work costs every step (why one thread runs all of it).

    python bench/threads.py [--steps 20] [--tokens 128]

Part 1, a ModelRunner on the default model (fp32, 170 cached tokens): the fastest of `--steps`
one-row steps (a) with every torch call so far on the main thread, (b) on the main thread after
a second, still-running thread has done one forward, (c) on that second thread, (d) on the main
thread again once the second thread has exited.

Part 2, the engine as the server builds it (`build_engine`, lookahead off): ms per token of a
`--tokens` greedy request, (a) as built (all torch work on the engine's thread), (b) after the
main thread has run one matmul large enough to go parallel (a second OpenMP pool, as the server
had before its model moved onto the engine's thread).
"""

from __future__ import annotations

import argparse
import queue
import threading
import time

import torch
from trieserve.decoding.sampling import SamplingParams
from trieserve.server.builder import build_engine
from trieserve.server.model import load_model, prepare_default_model
from trieserve.server.runner import ModelRunner
from trieserve.server.sequence import Delta, Failure, Finish, GenerationRequest
from trieserve.server.settings import Settings


class Worker:
    """A thread that runs what it is handed and stays alive until `close`."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while (job := self.jobs.get()) is not None:
            fn, box, done = job
            box.append(fn())
            done.set()

    def call(self, fn):
        box, done = [], threading.Event()
        self.jobs.put((fn, box, done))
        done.wait()
        return box[0]

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def runner_part(steps: int) -> None:
    settings = Settings()
    model, _ = load_model(prepare_default_model(settings.cache_dir), "float32", "cpu")
    runner = ModelRunner(model, prefill_chunk=512, skinny_rows=0)
    cache = runner.new_cache()
    runner.prefill(cache, [100 + i for i in range(170)])

    def best_step() -> float:
        torch.set_grad_enabled(False)
        best = float("inf")
        for _ in range(steps):
            start = time.perf_counter()
            runner.step(cache, torch.tensor([5]), torch.tensor([170]), None)
            best = min(best, time.perf_counter() - start)
            cache.truncate_new(1, 0)
        return best * 1e3

    print(f"(a) main thread only:                    {best_step():6.1f} ms per one-row step")
    worker = Worker()
    worker.call(lambda: runner.prefill(runner.new_cache(), [100 + i for i in range(32)]))
    print(f"(b) main, a second thread has run torch: {best_step():6.1f} ms")
    print(f"(c) on that second thread:               {worker.call(best_step):6.1f} ms")
    worker.close()
    print(f"(d) main, the second thread has exited:  {best_step():6.1f} ms")


def engine_part(tokens: int) -> None:
    engine, tokenizer = build_engine(Settings(lookahead=False))
    prompt = tokenizer("Write a long story about a lighthouse keeper and the sea.")["input_ids"] * 8

    def per_token() -> float:
        done, out = threading.Event(), []

        def emit(event) -> None:
            if isinstance(event, Delta):
                out.extend(event.token_ids)
            elif isinstance(event, (Finish, Failure)):
                done.set()

        request = GenerationRequest(
            prompt_ids=list(prompt), max_tokens=tokens, params=SamplingParams(temperature=0.0), ignore_eos=True
        )
        start = time.perf_counter()
        engine.submit(request, emit)
        done.wait()
        return (time.perf_counter() - start) / max(len(out), 1) * 1e3

    per_token()  # warm-up
    print(
        f"(a) engine as built:                      {per_token():6.1f} ms per token ({tokens} tokens, prefill included)"
    )
    torch.randn(2048, 2048) @ torch.randn(2048, 2048)  # the main thread's own OpenMP pool
    print(f"(b) after the main thread ran one matmul: {per_token():6.1f} ms per token")
    engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    # part 2 first: part 1 leaves the main thread with an OpenMP pool of its own
    engine_part(args.tokens)
    runner_part(args.steps)


if __name__ == "__main__":
    main()
