"""A causal LM's forward step over a static KV cache (`KVCacheStep`) and the cache layout.

`KVCacheStep` wraps the model's own forward (GPT-2, Llama, Mistral, Qwen2, ...: any
`transformers` causal LM whose attention goes through the `Cache` API) so one step is a
pure function of tensors: (ids [B, q], pos [], attention_mask [B, max_len], keys, values)
-> (next-token logits [B, vocab], new keys, new values). The static caches
[layers, B, kv_heads, max_len, head_dim] are graph inputs; a step-local cache object hands
the model its past slab concatenated with the new tokens' keys/values, and the step returns
only the new ones, which the generator writes into the caches in place. The step builds the
4-D attention mask itself (cached slots below `pos`, causal among the new tokens, left
padding from `attention_mask`, sliding windows per layer type), so every family's masking
code is bypassed the same way, and the positions as Hugging Face's `generate` does
(cumulative sum of the mask). Two compiled graphs of the step (a prefill graph per prompt
length and a decode graph for one token) go through the strategy's passes, so quantization
and fusion apply, and each can be exported like any compiled model.
"""

from __future__ import annotations

import functools
import inspect

import attrs
import torch
import torch.nn as nn

from ..compiler.errors import StratoError


class GenerationError(StratoError, ValueError):
    """The model or the request does not fit the KV-cache generator."""


# ---------------------------------------------------------------------- the model


def check_causal_lm(model: nn.Module) -> None:
    """Raise GenerationError unless `model` is a Hugging Face causal LM with a KV cache."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or not hasattr(model, "can_generate"):
        raise GenerationError(
            f"generate: {name} is not a Hugging Face transformers model; generate runs the "
            "causal LMs of transformers (e.g. GPT2LMHeadModel, LlamaForCausalLM)."
        )
    if head is None or not model.can_generate() or getattr(config, "is_encoder_decoder", False):
        raise GenerationError(
            f"generate: {name} has no causal-LM head (it is not a decoder-only model that "
            "predicts next tokens); compile its *ForCausalLM / *LMHeadModel class, e.g. "
            "LlamaForCausalLM instead of LlamaModel."
        )
    if _cache_kwarg(model) is None:
        raise GenerationError(
            f"generate: {name}.forward takes no KV cache (no 'cache' / 'past_key_values' "
            "argument), so it cannot decode one token at a time."
        )


def _cache_kwarg(model: nn.Module) -> str | None:
    """The forward argument that takes a transformers Cache ('cache' from transformers 5.x)."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def position_limit(config) -> int | None:
    """How many positions the model's position table holds (None: no stated limit)."""
    return _position_field(config)[0]


def _position_field(config) -> tuple[int | None, str | None]:
    for field in ("max_position_embeddings", "n_positions"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value, f"config.{field}"
    return None, None


@attrs.frozen
class CacheLayout:
    """What serving a causal LM needs besides its step graphs: the static caches' shapes
    and dtype and the position limit (an exported artifact stores it in its manifest)."""

    layers: int
    """Decoder layers (the caches' first dim)."""
    key_shape: tuple[int, int]
    """(kv_heads, head_dim) of one layer's keys."""
    value_shape: tuple[int, int]
    """(kv_heads, head_dim) of one layer's values."""
    dtype: str
    """The caches' dtype: the model's parameters' ('float32', 'bfloat16', ...)."""
    position_limit: int | None
    """The most tokens (prompt + new) the model's positions cover; None: no stated limit."""
    position_field: str | None
    """Where that limit comes from, e.g. 'config.max_position_embeddings'."""

    def cache_shapes(self, batch: int, max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the (keys, values) caches [layers, batch, kv_heads, max_len, head_dim]."""
        (kh, kd), (vh, vd) = self.key_shape, self.value_shape
        return (self.layers, batch, kh, max_len, kd), (self.layers, batch, vh, max_len, vd)

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        """A request longer than the model's position table is refused, naming both numbers."""
        total = prompt_len + max_new_tokens
        if self.position_limit is not None and total > self.position_limit:
            raise GenerationError(
                f"generate: prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
                f"{total} tokens exceeds the model's position table ({self.position_field} = "
                f"{self.position_limit}); shorten the prompt or ask for fewer tokens."
            )

    def per_rank(self, tensor_parallel: int) -> CacheLayout:
        """The caches one rank of a tensor group holds: its share of the KV heads."""
        if tensor_parallel == 1:
            return self
        (kh, kd), (vh, vd) = self.key_shape, self.value_shape
        if kh % tensor_parallel or vh % tensor_parallel:
            raise GenerationError(
                f"generate: {kh} KV heads do not divide over TensorParallel.size="
                f"{tensor_parallel}; choose a size that divides {kh}."
            )
        return attrs.evolve(
            self,
            key_shape=(kh // tensor_parallel, kd),
            value_shape=(vh // tensor_parallel, vd),
        )

    def to_json(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CacheLayout:
        try:
            layout = cls(
                layers=int(data["layers"]),
                key_shape=tuple(int(d) for d in data["key_shape"]),
                value_shape=tuple(int(d) for d in data["value_shape"]),
                dtype=str(data["dtype"]),
                position_limit=data["position_limit"],
                position_field=data["position_field"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GenerationError(f"generation cache layout {data!r} is malformed ({exc})") from exc
        if not isinstance(getattr(torch, layout.dtype, None), torch.dtype):
            raise GenerationError(f"generation cache layout: {layout.dtype!r} is not a dtype")
        return layout


def _layer_windows(config, n_layers: int) -> list[int | None]:
    """Each layer's sliding attention window (None: full attention), as the config says."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        other = sorted(set(types) - {"full_attention", "sliding_attention"})
        if other:
            raise GenerationError(
                f"generate: layers of type {other} (config.layer_types) are not supported; "
                "generate handles full and sliding-window attention layers."
            )
        return [window if t == "sliding_attention" else None for t in types[:n_layers]]
    if window is not None and getattr(config, "use_sliding_window", True):
        return [window] * n_layers
    return [None] * n_layers


@functools.cache
def _cache_layer_class():
    from transformers.cache_utils import DynamicLayer

    class StepLayer(DynamicLayer):
        """One layer's cache for one step: the static past slab, plus what this step adds."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values = keys, values
            self.is_initialized = True
            self.new_keys: torch.Tensor | None = None
            self.new_values: torch.Tensor | None = None

        def update(self, key_states, value_states, *args, **kwargs):
            self.new_keys, self.new_values = key_states, value_states
            return (
                torch.cat([self.keys, key_states], dim=-2),
                torch.cat([self.values, value_states], dim=-2),
            )

    return StepLayer


class KVCacheStep(nn.Module):
    """One forward step of a causal LM over a static KV cache.

    (ids [B, q], pos [], attention_mask [B, max_len], keys, values) -> (logits [B, vocab]
    of the last new token, new keys, new values). `pos` (0-d) is the cache slot of ids[:, 0]; the
    caches hold slots [0, pos). `attention_mask` is 1 at every slot that holds (or, for these
    q tokens, will hold) a real token, 0 at left padding. The new keys/values are
    [layers, B, kv_heads, q, head_dim], to be written at slots [pos, pos + q).
    """

    tensor_parallel_inputs = {"keys": 2, "values": 2}
    """Under tensor parallelism the caches arrive holding this rank's KV heads (dim 2), and
    the new keys/values (outputs 1 and 2) leave so: the tensor_parallel pass keeps them split."""
    tensor_parallel_outputs = {1: 2, 2: 2}

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        check_causal_lm(model)
        self.model = model
        self.cache_kwarg = _cache_kwarg(model)
        params = inspect.signature(model.forward).parameters
        self.keeps_logits = "logits_to_keep" in params
        self.layer_shapes = self._probe_cache(model)
        self.windows = _layer_windows(model.config, len(self.layer_shapes))

    def _probe_cache(self, model: nn.Module) -> list[tuple[torch.Size, torch.Size]]:
        """Per-layer [kv_heads, head_dim] shapes of keys and values, from one eager token
        (of the whole model: tensor-parallel blocks hold their whole shapes meanwhile)."""
        from .tensor_parallel import whole_parameters

        param = next(model.parameters())
        ids = torch.zeros(1, 1, dtype=torch.long, device=param.device)
        with torch.no_grad(), whole_parameters(model):
            out = model(input_ids=ids, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
            raise GenerationError(
                f"generate: {type(model).__name__} returned no per-layer key/value cache; "
                "generate supports models whose attention caches keys and values."
            )
        shapes = [(layer.keys.shape, layer.values.shape) for layer in layers]
        if any(k[2] != 1 or v[2] != 1 for k, v in shapes):
            raise GenerationError(
                f"generate: {type(model).__name__} caches something other than one key/value "
                f"per token ({shapes[0]}); it needs its own cache layout."
            )
        if len({(k[1], k[3], v[1], v[3]) for k, v in shapes}) != 1:
            raise GenerationError(
                f"generate: {type(model).__name__}'s layers cache keys/values of different "
                "shapes; one static cache tensor cannot hold them."
            )
        return shapes

    wrapped_prefix = "model."
    """Module paths of the model's layers in this step's graphs start with this (the quantize
    pass matches `Quantize.skip` globs on the paths without it)."""

    @property
    def wrapped_model(self) -> nn.Module:
        """The causal LM this step runs (the quantize pass calibrates on calls of it)."""
        return self.model

    def layout(self) -> CacheLayout:
        """The static caches' shapes and dtype and the model's position limit."""
        (k, v), n = self.layer_shapes[0], len(self.layer_shapes)
        limit, field = _position_field(self.model.config)
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return CacheLayout(n, (k[1], k[3]), (v[1], v[3]), dtype, limit, field)

    def forward(self, ids, pos, attention_mask, keys, values):
        from transformers.cache_utils import Cache

        batch, q_len = ids.shape
        max_len = keys.shape[3]
        slots = pos + torch.arange(q_len, device=ids.device)  # [q] cache slots of the new tokens
        valid = attention_mask.bool()
        # Positions as transformers' generate counts them: real tokens before, pads at 0.
        counted = valid.long().cumsum(-1) - 1
        positions = counted.index_select(1, slots).masked_fill(~valid.index_select(1, slots), 0)
        layer_class = _cache_layer_class()
        layers = [layer_class(keys[i], values[i]) for i in range(keys.shape[0])]
        cache = Cache(layers=layers)
        masks = {
            w: self._mask(valid, pos, slots, max_len, w, keys.dtype) for w in set(self.windows)
        }
        if len(masks) == 1:
            mask = next(iter(masks.values()))
        else:
            mask = {
                "full_attention": masks[None],
                "sliding_attention": next(m for w, m in masks.items() if w is not None),
            }
        extra = {"logits_to_keep": 1} if self.keeps_logits else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: cache},
            **extra,
        )
        logits = out.logits[:, -1]
        new_keys = torch.stack([layer.new_keys for layer in layers])
        new_values = torch.stack([layer.new_values for layer in layers])
        return logits, new_keys, new_values

    @staticmethod
    def _mask(valid, pos, slots, max_len, window, dtype):
        """Additive mask [B, 1, q, max_len + q] over (cached slots, new tokens).

        A query sees cached slots below `pos` and new tokens up to itself that hold real
        tokens (and lie within `window` slots); it always sees itself, so a padding row
        stays finite (its output is never read, and a NaN there would poison the rows
        that multiply its zero-weighted value)."""
        q_len = slots.shape[0]
        cached = torch.arange(max_len, device=slots.device)
        keys_slot = torch.cat([cached, slots])  # [max_len + q]
        is_new = torch.arange(max_len + q_len, device=slots.device) >= max_len
        key_valid = torch.cat([valid, valid.index_select(1, slots)], dim=1)  # [B, max_len + q]
        q_slot = slots[:, None]  # [q, 1]
        seen = (keys_slot[None] < pos) & ~is_new[None]  # cached slots already written
        seen = seen | (is_new[None] & (keys_slot[None] <= q_slot))  # causal among new tokens
        if window is not None:
            seen = seen & (keys_slot[None] > q_slot - window)
        allowed = seen[None] & key_valid[:, None, :]  # [B, q, max_len + q]
        itself = is_new[None] & (keys_slot[None] == q_slot)
        allowed = (allowed | itself[None])[:, None]
        zero = torch.zeros((), dtype=dtype, device=slots.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
