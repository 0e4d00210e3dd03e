"""Greedy text generation with a KV cache for Llama-style causal LMs.

Two compiled graphs of one step module (`KVCacheStep`): a prefill graph for the prompt
length and a decode graph for one token. Both read the static caches [layers, batch,
kv_heads, max_len, head_dim] as inputs and return only the new tokens' keys/values;
the generator writes those into the caches in place between steps. Attention is split
into the cached part (masked to positions already written) and the new tokens (causal),
so a step never copies the cache. Both graphs go through the strategy's passes (so
quantization applies) and can be exported like any compiled model.
"""

from __future__ import annotations

import time

import attrs
import torch
import torch.nn as nn

from ..compiler.errors import StratoError


class GenerationError(StratoError, ValueError):
    """The model or the request does not fit the KV-cache generator."""


def _parts(model: nn.Module):
    """The decoder stack and LM head of a Hugging Face Llama-style causal LM."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        raise GenerationError(
            f"{type(model).__name__}: the KV-cache generator supports Llama-style causal LMs "
            "(model.model.{embed_tokens, layers, norm, rotary_emb} and model.lm_head), e.g. "
            "transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM."
        )
    return inner, model.lm_head


def _matmul_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, with a single row of `a` doubled and the copy dropped again.

    Inductor lowers a one-row batched matmul on CPU (decoding without grouped queries) to
    an elementwise product and a sum, into which it folds everything that made `a` (the
    rotary embedding of the query, the softmax), recomputed for every cached position:
    10-20x slower than the BLAS call two rows get.
    """
    if a.shape[-2] != 1:
        return a @ b
    return (a.expand(*a.shape[:-2], 2, a.shape[-1]) @ b)[..., :1, :]


class KVCacheStep(nn.Module):
    """One forward step: (ids [B, q], pos [1], keys, values) -> (last logits, new keys, new values).

    `pos` is the cache position of ids[:, 0]; the caches hold positions [0, pos). The new
    keys/values are [layers, B, kv_heads, q, head_dim], to be written at [pos, pos + q).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _parts(model)
        self.model = model
        config = model.config
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads

    def forward(self, ids, pos, keys, values):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner, lm_head = _parts(self.model)
        batch, q_len = ids.shape
        max_len = keys.shape[3]
        positions = pos + torch.arange(q_len, device=ids.device)  # [q]
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, positions[None].expand(batch, q_len))
        past_ok = torch.arange(max_len, device=ids.device)[None, :] < pos  # [1, max_len]
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=ids.device).tril()
        groups = self.n_heads // self.n_kv_heads
        new_keys, new_values = [], []
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(batch, q_len, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            new_keys.append(k)
            new_values.append(v)
            # Group query heads onto their kv head: [B, kv, groups * q, D].
            qg = q.reshape(batch, self.n_kv_heads, groups * q_len, self.head_dim)
            scale = self.head_dim**-0.5
            past = _matmul_rows(qg, keys[i].transpose(-1, -2)) * scale  # [B, kv, g*q, max_len]
            past = past.masked_fill(~past_ok, float("-inf"))
            new = (qg @ k.transpose(-1, -2)) * scale  # [B, kv, g*q, q]
            new = new.masked_fill(~causal.repeat(groups, 1), float("-inf"))
            probs = torch.cat([past, new], dim=-1).softmax(dim=-1)
            out = _matmul_rows(probs[..., :max_len], values[i]) + probs[..., max_len:] @ v
            out = out.reshape(batch, self.n_heads, q_len, self.head_dim).transpose(1, 2)
            h = h + attn.o_proj(out.reshape(batch, q_len, self.n_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = lm_head(inner.norm(h[:, -1:]))
        return logits, torch.stack(new_keys), torch.stack(new_values)


@attrs.frozen
class Generation:
    """Generated token ids and how fast they came."""

    tokens: torch.Tensor
    """[batch, prompt + new] token ids."""
    prefill_s: float
    decode_s: float
    new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first, per second, per sequence."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


class Generator:
    """Greedy generation with compiled prefill and decode-step graphs and a static KV cache."""

    def __init__(self, model: nn.Module, strategy=None, *, max_len: int = 256, batch: int = 1):
        self.step = KVCacheStep(model).eval()
        self.strategy = strategy
        self.max_len = max_len
        self.batch = batch
        param = next(model.parameters())
        layers = len(_parts(model)[0].layers)
        self.cache_shape = (layers, batch, self.step.n_kv_heads, max_len, self.step.head_dim)
        self.dtype, self.device = param.dtype, param.device
        self._graphs: dict[int, nn.Module] = {}

    def empty_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        def zeros():
            return torch.zeros(self.cache_shape, dtype=self.dtype, device=self.device)

        return zeros(), zeros()

    def graph(self, q_len: int) -> nn.Module:
        """The compiled step for `q_len` new tokens (1: the decode graph), built on first use."""
        if q_len not in self._graphs:
            from ..compiler.compile import compile

            keys, values = self.empty_cache()
            ids = torch.zeros(self.batch, q_len, dtype=torch.long, device=self.device)
            pos = torch.zeros(1, dtype=torch.long, device=self.device)
            self._graphs[q_len] = compile(
                self.step, self.strategy, example_inputs=(ids, pos, keys, values)
            )
        return self._graphs[q_len]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> Generation:
        """Greedy continuation of `prompt` [batch, P] by `max_new_tokens` tokens."""
        if prompt.dim() != 2 or prompt.shape[0] != self.batch:
            raise GenerationError(
                f"prompt must be [batch={self.batch}, length] token ids, got {tuple(prompt.shape)}"
            )
        total = prompt.shape[1] + max_new_tokens
        if total > self.max_len:
            raise GenerationError(
                f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                f"max_len={self.max_len}; build the Generator with a larger max_len."
            )
        prefill, decode = self.graph(prompt.shape[1]), self.graph(1)
        keys, values = self.empty_cache()
        tokens = [prompt]
        start = time.perf_counter()
        pos = 0
        ids = prompt
        decode_start = None
        for step in range(max_new_tokens):
            graph = prefill if step == 0 else decode
            logits, new_k, new_v = graph(ids, torch.tensor([pos], device=self.device), keys, values)
            q_len = ids.shape[1]
            keys[:, :, :, pos : pos + q_len] = new_k
            values[:, :, :, pos : pos + q_len] = new_v
            pos += q_len
            ids = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(ids)
            if step == 0:
                decode_start = time.perf_counter()
        end = time.perf_counter()
        decode_start = decode_start or end
        return Generation(
            tokens=torch.cat(tokens, dim=1),
            prefill_s=decode_start - start,
            decode_s=end - decode_start,
            new_tokens=max_new_tokens,
        )
