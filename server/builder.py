"""Assemble the engine from settings: the one place that turns configuration into objects."""

from __future__ import annotations

import logging

from trieserve.server.engine import Engine, EngineConfig
from trieserve.server.model import load_model, resolve_model_path
from trieserve.server.runner import ModelRunner
from trieserve.server.settings import Settings

log = logging.getLogger(__name__)


def build_engine(settings: Settings, metrics=None):
    """Returns (started engine, tokenizer)."""
    import torch

    path = resolve_model_path(settings.model, settings.cache_dir)
    device = settings.resolved_device()
    log.info("loading %s on %s (%s)", path, device, settings.dtype)
    torch.manual_seed(0)
    model, tokenizer = load_model(path, settings.dtype, device)
    runner = ModelRunner(model, prefill_chunk=settings.prefill_chunk)
    config = EngineConfig(
        max_queue=settings.max_queue, max_num_seqs=settings.max_num_seqs, lookahead=settings.lookahead
    )
    engine = Engine(runner, tokenizer, config, metrics=metrics, speculator=None)
    engine.start()
    return engine, tokenizer
