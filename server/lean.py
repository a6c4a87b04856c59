"""A lean decoder forward for Llama-architecture models: the same arithmetic, fewer operations.

A decode step of a small model on a CPU is two things: streaming the weights through the
matmuls (memory-bound, ~2/3 of a SmolLM2-135M step) and a fixed cost of several hundred small
operator calls and Python module calls per forward (~1/4 of it). The second does not shrink
with batching or speculation and is paid again on every step. This forward walks the same
decoder layers with fewer calls: q/k/v and gate/up are each one matmul over a fused weight,
RMSNorm is one fused call (fp32), no module wrappers or mask building per layer.

It changes no result: every output element is computed by the same kernel with the same
summation order (a fused weight's rows are the original rows; MKL's sum over the inner
dimension does not depend on how many rows the weight has, and `tests/test_lean.py` checks the
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
    """True for the architectures whose layers this forward reproduces exactly: Llama-style
    decoders without projection biases, with SiLU MLPs and RMSNorm."""
    config = model.config
    return (
        getattr(config, "model_type", None) == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", None) == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
        and hasattr(model, "model")
        and hasattr(model.model, "rotary_emb")
    )


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
    if h.dtype == torch.float32:  # one fused call, bit-identical to the formula below in fp32
        return F.rms_norm(h, (h.shape[-1],), weight, eps)
    variance = h.float().pow(2).mean(-1, keepdim=True)  # the transformers formula: fp32 inside
    return weight * (h.float() * torch.rsqrt(variance + eps)).to(h.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class LeanLlama:
    """`forward(input_ids, position_ids, cache, **attention_kwargs)` -> last hidden states, as
    `model.model(...).last_hidden_state` would return them. Built once per model; fuses the
    weights in place (see the module docstring)."""

    def __init__(self, model, attention: Callable, max_rows: Callable[[], int]) -> None:
        self.model = model
        self.attention = attention
        self.max_rows = max_rows  # the matmul route's current skinny range (see matmul.py)
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
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, **kwargs) -> torch.Tensor:
        """input_ids, position_ids [1, T]; returns hidden states [1, T, hidden]."""
        max_rows = self.max_rows()

        def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return matmul.linear(x, weight, None, max_rows)

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
