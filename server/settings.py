"""The one place configuration is read: CLI flags and `TRIESERVE_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from platformdirs import user_cache_dir
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KV_POLICIES = ("full", "streaming", "snapkv", "adakv", "defensive", "layer_defensive")
LOOKAHEAD_MODES = ("hierarchical", "parallel", "single")


class Settings(BaseSettings):
    """Server settings. Every field is a `--flag` of `trieserve serve` and a `TRIESERVE_<NAME>` env var."""

    model_config = SettingsConfigDict(env_prefix="TRIESERVE_", extra="ignore", protected_namespaces=())

    # model
    model: str | None = Field(None, description="local HF model folder; unset = the built-in SmolLM2-135M-Instruct")
    served_model_name: str | None = Field(None, description="model id reported by the API (default: folder name)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="weights/activations dtype")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu' or 'cuda[:N]'")
    cache_dir: Path = Field(Path(user_cache_dir("trieserve")), description="where the converted default model lives")
    tuning_dir: Path | None = Field(
        None,
        description="where the measured CPU matmul route and forward-cost ladders are kept (unset: CACHE_DIR); "
        "a measurement taken while other work loads the machine is kept there until deleted",
    )
    # http
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # security and limits
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on /v1/* and /metrics")
    api_key_file: Path | None = Field(None, description="file with one API key per line (adds to --api-key)")
    metrics_open: bool = Field(False, description="serve /metrics without a key even when keys are set")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(600.0, gt=0, description="a request running longer is cancelled (408)")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (off when empty)")
    # engine
    max_queue: int = Field(64, ge=1, description="requests waiting beyond this get 429")
    max_num_seqs: int = Field(8, ge=1, description="sequences decoding at once")
    prefill_chunk: int = Field(512, ge=16, description="prompt tokens per prefill forward")
    skinny_rows: int | None = Field(
        None,
        ge=0,
        le=64,
        description="CPU: forwards of 2..N rows take the few-row matmul kernel (--matmul-kernel), one row "
        "too where the kernel clearly wins there; 0 = off; unset = measured at start-up and cached per machine",
    )
    matmul_kernel: Literal["auto", "skinny", "stream"] = Field(
        "auto",
        description="CPU: the kernel for forwards of 2..N rows: skinny (weight @ x.T) or stream (a C++ kernel "
        "built at first start, fp32); auto = measured at start-up with the range",
    )
    lean_forward: bool = Field(
        True,
        description="Llama-architecture models on the CPU in fp32 run a lean decoder forward (same logits, "
        "fewer operations); off: the transformers forward",
    )
    decode_attention: Literal["auto", "kernel", "sdpa"] = Field(
        "auto",
        description="CPU, fp32: the attention of decode rows and lookahead trees in a step, all sequences in one "
        "call of a C++ kernel built with the matmul kernel (auto: where it can be built), or SDPA per sequence",
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="on shutdown, running requests get this long to finish")
    # lookahead
    lookahead: bool = Field(True, description="speculate with the trie (per-request `lookahead` overrides)")
    decoding_length: int = Field(64, ge=0, le=256, description="max draft tokens in one step's tree")
    branch_length: int = Field(12, ge=1, le=64, description="max depth of a draft branch")
    lookahead_mode: Literal["hierarchical", "parallel", "single"] = "hierarchical"
    max_match: int = Field(4, ge=1, le=16, description="longest context suffix matched in the trie")
    adaptive_budget: bool = Field(
        True, description="size each draft tree for the best expected tokens/s (off: always draft the full budget)"
    )
    trie_path: Path | None = Field(None, description="file the shared output trie is loaded from and saved to")
    trie_capacity: int = Field(500_000, ge=1000, description="max nodes of the shared output trie")
    kernels: Literal["auto", "reference", "triton"] = Field(
        "auto", description="auto: Triton kernels on CUDA, PyTorch references elsewhere; or force one"
    )
    # kv cache
    kv_policy: Literal["full", "streaming", "snapkv", "adakv", "defensive", "layer_defensive"] = "full"
    kv_budget: float = Field(1.0, gt=0, description="kept KV entries: a fraction (<=1) or a token count (>1)")
    kv_window: int = Field(
        32,
        ge=1,
        description="observation window for eviction scores: the last tokens of the prompt "
        "(and, with --kv-regrow, of everything seen)",
    )
    kv_regrow: int = Field(
        0,
        ge=0,
        description="evict again each time a sequence's cache has grown by this many tokens, to the budget "
        "of all it has seen (at least --kv-window); 0 = at prefill only",
    )
    prefix_cache_mb: int = Field(
        256,
        ge=0,
        description="MiB of prompt KV rows kept for prompts that start alike (automatic prefix caching); 0 = off",
    )

    @model_validator(mode="after")
    def _check_regrow(self):
        if 0 < self.kv_regrow < self.kv_window:
            raise ValueError(f"kv_regrow ({self.kv_regrow}) must be 0 or at least kv_window ({self.kv_window})")
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not v.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {v!r}")
        return v

    def api_keys(self) -> list[str]:
        keys = [self.api_key] if self.api_key else []
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read api_key_file {self.api_key_file}: {exc}") from None
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        return keys

    def tuning(self) -> Path:
        """Where measured routes and cost ladders live: `tuning_dir`, else `cache_dir`."""
        return self.tuning_dir if self.tuning_dir is not None else self.cache_dir

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
