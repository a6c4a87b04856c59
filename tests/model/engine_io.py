"""Submitting a request to an in-process engine and collecting what it streams back."""

import queue

from trieserve.server.sequence import Delta, Failure, Finish, GenerationRequest


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
