"""A lean decoder forward for Llama-architecture models: the same arithmetic, fewer operations.

A decode step of a small model on a CPU is two things: streaming the weights through the
matmuls (memory-bound, ~2/3 of a SmolLM2-135M step) and a fixed cost of several hundred small
operator calls and Python module calls per forward (~1/4 of it). The second does not shrink
with batching or speculation and is paid again on every step. This forward walks the same
decoder layers with fewer calls: q/k/v and gate/up are each one matmul over a fused weight,
RMSNorm is one call, no module wrappers or mask building per layer. CPU, fp32 only
(`supports`).

It changes no result: every output element is computed by the same kernel with the same
summation order (a fused weight's rows are the original rows; MKL's sum over the inner
dimension does not depend on how many rows the weight has, and `tests/model/test_lean.py` checks the
logits bit for bit against the transformers forward for prefill, tree and batched steps). The
fused weights replace the originals, whose parameters become views of them: no memory is
added and the transformers forward (kept for other architectures and as the reference) reads
the same numbers.

KV caching and attention are untouched: each layer calls `cache.update` and the registered
attention function exactly as the transformers layer does, with the same keyword arguments
(tree masks, batch layout, window capture), so everything built on those works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from trieserve.server import matmul


def supports(model) -> bool:
    """True where this forward is checked to reproduce the transformers forward bit for bit:
    Llama-style decoders (no projection biases, SiLU MLPs, RMSNorm) with plain, unquantized
    fp32 `nn.Linear` projections, on the CPU. Elsewhere (CUDA kernels and cuBLAS may sum in a
    different order for the fused shapes; quantized layers carry scales) the transformers
    forward runs."""
    config = model.config
    if not (
        getattr(config, "model_type", None) == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", None) == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
        and getattr(config, "quantization_config", None) is None
        and hasattr(model, "model")
        and hasattr(model.model, "rotary_emb")
    ):
        return False
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if not isinstance(proj, nn.Linear) or proj.bias is not None:
                return False
            if proj.weight.device.type != "cpu" or proj.weight.dtype != torch.float32:
                return False
    return True


def _fuse(modules: list[nn.Linear]) -> torch.Tensor:
    """One weight holding the modules' weights row after row; each module's weight becomes a
    view of its rows (so nothing is stored twice)."""
    fused = torch.cat([m.weight.detach() for m in modules]).contiguous()
    at = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused[at : at + rows], requires_grad=False)
        at += rows
    return fused


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # one call; on the CPU in fp32 it computes the transformers formula, bit for bit
    return F.rms_norm(h, (h.shape[-1],), weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class LeanLlama:
    """`forward(input_ids, position_ids, cache, **attention_kwargs)` -> last hidden states, as
    `model.model(...).last_hidden_state` would return them. Built once per model; fuses the
    weights in place (see the module docstring)."""

    @classmethod
    def of(cls, model, attention: Callable) -> LeanLlama:
        """The model's lean forward, built (and its weights fused) on first use only."""
        lean = getattr(model, "_trieserve_lean", None)
        if lean is None:
            lean = cls(model, attention)
            model._trieserve_lean = lean
        return lean

    def __init__(self, model, attention: Callable) -> None:
        self.model = model
        self.attention = attention
        base = model.model
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.norm = base.norm
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    attn,
                    layer.input_layernorm.weight,
                    layer.input_layernorm.variance_epsilon,
                    _fuse([attn.q_proj, attn.k_proj, attn.v_proj]),
                    (  # heads: queries + keys, queries
                        (attn.q_proj.weight.shape[0] + attn.k_proj.weight.shape[0]) // attn.head_dim,
                        attn.q_proj.weight.shape[0] // attn.head_dim,
                    ),
                    attn.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    layer.post_attention_layernorm.variance_epsilon,
                    _fuse([mlp.gate_proj, mlp.up_proj]),
                    mlp.down_proj.weight,
                )
            )

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        max_rows: int = 0,
        kernel: str = "skinny",
        min_rows: int = 2,
        **kwargs,
    ) -> torch.Tensor:
        """input_ids, position_ids [1, T]; returns hidden states [1, T, hidden]. `max_rows`,
        `kernel`, `min_rows`: the few-row matmul route (server/matmul.py)."""

        def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return matmul.linear(x, weight, None, max_rows, kernel, min_rows)

        h = self.embed(input_ids)
        cos, sin = self.rotary(h, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        b, t = input_ids.shape
        for attn, n1, eps1, qkv_w, heads, o_w, n2, eps2, gu_w, down_w in self.layers:
            qkv = linear(_rms_norm(h, n1, eps1), qkv_w).view(b, t, -1, attn.head_dim).transpose(1, 2)
            qk = _rotate(qkv[:, : heads[0]], cos, sin)  # queries and keys rotated in one pass
            q, k, v = qk[:, : heads[1]], qk[:, heads[1] :], qkv[:, heads[0] :]
            k, v = cache.update(k, v, attn.layer_idx)
            out, _ = self.attention(attn, q, k, v, None, scaling=attn.scaling, **kwargs)
            h = h + linear(out.reshape(b, t, -1), o_w)
            gate, up = linear(_rms_norm(h, n2, eps2), gu_w).chunk(2, dim=-1)
            h = h + linear(F.silu(gate) * up, down_w)
        return self.norm(h)
