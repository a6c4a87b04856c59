"""Assemble the engine from settings: the one place that turns configuration into objects."""

from __future__ import annotations

import hashlib
import logging
import platform
import threading

from trieserve.decoding.draft import DraftConfig
from trieserve.decoding.trie import OutputStore
from trieserve.kernels.dispatch import set_backend
from trieserve.server import matmul
from trieserve.server.budget import StepCost
from trieserve.server.engine import Engine, EngineConfig
from trieserve.server.model import load_model, resolve_model_path
from trieserve.server.runner import ModelRunner
from trieserve.server.settings import Settings
from trieserve.server.speculation import Speculator

log = logging.getLogger(__name__)


def build_engine(settings: Settings, metrics=None):
    """Returns (started engine, tokenizer). The model is loaded, measured and run on one new
    thread, the engine's (why: server/engine.py); errors while building are raised here."""
    built: dict = {}
    ready = threading.Event()

    def engine_thread() -> None:
        try:
            engine, tokenizer = _build(settings, metrics)
            engine.built_on = threading.current_thread()
            engine.bind_to_current_thread()
            built["engine"] = engine, tokenizer
        except BaseException as exc:
            built["error"] = exc
            return
        finally:
            ready.set()
        engine.run()

    threading.Thread(target=engine_thread, name="trieserve-engine", daemon=True).start()
    ready.wait()
    if "error" in built:
        raise built["error"]
    return built["engine"]


def _build(settings: Settings, metrics=None):
    import torch

    path = resolve_model_path(settings.model, settings.cache_dir)
    device = settings.resolved_device()
    log.info("loading %s on %s (%s)", path, device, settings.dtype)
    torch.manual_seed(0)
    set_backend(settings.kernels)
    model, tokenizer = load_model(path, settings.dtype, device)
    runner = ModelRunner(model, prefill_chunk=settings.prefill_chunk, skinny_rows=0, lean=settings.lean_forward)
    runner.set_route(matmul_route(settings, runner, path.name))
    kernels = decode_kernels(settings, runner)
    runner.use_kernels(kernels)
    config = EngineConfig(
        max_queue=settings.max_queue,
        max_num_seqs=settings.max_num_seqs,
        lookahead=settings.lookahead,
        kv_policy=settings.kv_policy,
        kv_budget=settings.kv_budget,
        kv_window=settings.kv_window,
        kv_regrow=settings.kv_regrow,
        prefix_cache_bytes=settings.prefix_cache_mb * 2**20,
    )
    engine = Engine(
        runner, tokenizer, config, metrics=metrics, speculator=build_speculator(settings, runner, path.name)
    )
    return engine, tokenizer


def matmul_route(settings: Settings, runner: ModelRunner, model_tag: str) -> matmul.Route:
    """The CPU few-row matmul route: `--skinny-rows` and `--matmul-kernel` where given, the rest
    this machine's measured choice (cached per hardware), one-row forwards included."""
    if runner.device.type != "cpu" or settings.skinny_rows == 0:
        return matmul.STOCK
    kernel = None if settings.matmul_kernel == "auto" else settings.matmul_kernel
    if kernel == "stream" and settings.dtype != "float32":
        raise ValueError(f"--matmul-kernel stream runs float32 models only (--dtype is {settings.dtype})")
    if kernel != "skinny" and settings.dtype == "float32":
        matmul.load_stream(settings.cache_dir / "ext")
        if kernel == "stream" and not matmul.stream_available():
            raise RuntimeError("--matmul-kernel stream: the kernel could not be built (the log says why)")
    if settings.skinny_rows is not None and kernel is not None:
        return matmul.Route(kernel, settings.skinny_rows)
    key = _hardware_key(settings, runner, model_tag, route=False)
    chosen = matmul.cached_route(runner, settings.tuning() / "matmul" / f"{key}.json", kernel)
    if settings.skinny_rows is not None:
        chosen = chosen._replace(max_rows=settings.skinny_rows)
    return chosen


MAX_HEAD_GROUP = 16  # query heads per KV head the decode kernel takes (kMaxGroup in stream_linear.cpp)


def decode_kernels(settings: Settings, runner: ModelRunner):
    """The built C++ kernels (server/stream_linear.cpp) whose `tree_attention` and
    `append_rows` take the decode rows and lookahead trees of steps, or None (SDPA and tensor ops):
    `--decode-attention auto` takes them where they can run (a CPU model in float32 with at
    most 16 query heads per KV head, a C++ compiler to build them), `kernel` insists, `sdpa`
    never."""
    if settings.decode_attention == "sdpa":
        return None
    config = runner.model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    grouping = heads % kv_heads == 0 and heads // kv_heads <= MAX_HEAD_GROUP  # the kernel's limit
    runs_here = runner.device.type == "cpu" and settings.dtype == "float32" and grouping
    module = matmul.load_stream(settings.cache_dir / "ext") if runs_here else None
    if module is None and settings.decode_attention == "kernel":
        raise RuntimeError(
            "--decode-attention kernel needs a float32 model on the CPU with at most 16 query heads per KV head, and a C++ compiler to build it (the log says why)"
        )
    return module


def build_speculator(settings: Settings, runner: ModelRunner, model_tag: str) -> Speculator | None:
    """The lookahead machinery; None when drafting is off for good (decoding_length 0)."""
    if settings.decoding_length == 0:
        return None
    config = DraftConfig(
        mode=settings.lookahead_mode, max_match=settings.max_match, branch_length=settings.branch_length
    )
    tag = f"{model_tag}:{runner.vocab_size}"
    store = OutputStore(capacity=settings.trie_capacity, ngram_len=config.ngram_len, tag=tag)
    path = settings.trie_path
    if path is not None and path.exists():
        try:
            store.load(path)
            log.info("trie store loaded from %s (%d nodes)", path, len(store))
        except (ValueError, OSError) as exc:
            log.error("ignoring the trie store at %s (%s); starting cold", path, exc)
    # measured now when lookahead is on by default; otherwise at the first request that asks for it
    cost_path = settings.tuning() / "step-cost" / f"{_hardware_key(settings, runner, model_tag)}.json"
    cost = StepCost.cached(runner, settings.decoding_length + 1, cost_path) if settings.lookahead else None
    return Speculator(
        store,
        config,
        settings.decoding_length,
        cost,
        trie_path=path,
        adaptive=settings.adaptive_budget,
        cost_path=cost_path,
    )


def _hardware_key(settings: Settings, runner: ModelRunner, model_tag: str, route: bool = True) -> str:
    """What a forward's cost depends on: the model, its dtype, the device, how many threads
    run it, which forward runs it (lean or transformers) and (`route`) the CPU matmul route
    (kernel, `skinny_min_rows`..`skinny_rows`) and the decode kernels. Each combination gets its own measured ladder; the route choice itself is
    keyed without the route."""
    import torch

    device = runner.device
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{platform.machine()}:{matmul.cpu_signature()}:{torch.get_num_threads()}threads"
    key = f"{model_tag}|{runner.vocab_size}|{runner.num_layers}|{settings.dtype}|{hardware}|torch{torch.__version__}"
    key += "|lean" if runner.lean is not None else "|transformers"
    if route:
        key += f"|{runner.matmul_kernel}{runner.skinny_min_rows}-{runner.skinny_rows}"
        if runner.step_attention is not None:
            key += "|step-attention"
        if (runner.matmul_kernel == "stream" and runner.skinny_rows) or runner.step_attention is not None:
            key += f"|{matmul.stream_key()}"  # another build of the kernels: another ladder
    return hashlib.sha256(key.encode()).hexdigest()[:16]
