"""Submitting a request to an in-process engine and collecting what it streams back."""

import queue

from trieserve.decoding.draft import DraftConfig
from trieserve.decoding.trie import OutputStore
from trieserve.server.budget import StepCost
from trieserve.server.engine import Engine, EngineConfig
from trieserve.server.sequence import Delta, Failure, Finish, GenerationRequest
from trieserve.server.speculation import Speculator


def full_budget_engine(runner, tokenizer, config: EngineConfig, branch_length: int, decoding_length: int = 16):
    """An engine (not started) on the session's runner that drafts its full budget every step
    (a fixed step cost, no adaptive sizing): every lookahead step runs a real tree."""
    draft = DraftConfig(branch_length=branch_length)
    store = OutputStore(10_000, draft.ngram_len, tag="test")
    speculator = Speculator(store, draft, decoding_length, StepCost([1], [1.0]), adaptive=False)
    return Engine(runner, tokenizer, config, speculator=speculator)


def repeat_prompt(tokenizer, text: str) -> list[int]:
    """A chat prompt asking the model to repeat `text`: output that lookahead can copy."""
    msgs = [{"role": "user", "content": f"Repeat this text exactly:\n\n{text}"}]
    return tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))


def run_request(engine, request: GenerationRequest, timeout: float = 300) -> tuple[list[int], Finish]:
    """The request's tokens and its Finish event; a Failure event is raised."""
    events: queue.Queue = queue.Queue()
    engine.submit(request, events.put)
    tokens: list[int] = []
    while True:
        ev = events.get(timeout=timeout)
        if isinstance(ev, Delta):
            tokens += ev.token_ids
        elif isinstance(ev, Failure):
            raise ev.error
        elif isinstance(ev, Finish):
            return tokens, ev
