"""Text generation with a static KV cache for Hugging Face causal LMs.

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
import time
from collections.abc import Sequence

import attrs
import torch
import torch.nn as nn

from ..compiler.errors import StratoError


class GenerationError(StratoError, ValueError):
    """The model or the request does not fit the KV-cache generator."""


CACHE_ALIGN = 64
"""A Generator without a fixed max_len sizes each call's caches to prompt + new tokens
rounded up to this (at most the model's position table)."""


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
        """Per-layer [kv_heads, head_dim] shapes of keys and values, from one eager token."""
        param = next(model.parameters())
        ids = torch.zeros(1, 1, dtype=torch.long, device=param.device)
        with torch.no_grad():
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


# ---------------------------------------------------------------------- choosing tokens


def next_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token per row [B, 1]: argmax at temperature 0, else sampled from
    softmax(logits / temperature) restricted to the top_k tokens, then to the smallest set
    whose probability reaches top_p (the order transformers applies them in)."""
    logits = logits.float()
    if not temperature:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = logits.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def _check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, int | float) or temperature < 0:
        raise GenerationError(
            f"generate: temperature must be a number >= 0 (0 = greedy), got {temperature!r}"
        )
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"generate: top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise GenerationError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}")


def _token_ids(value, field: str) -> list[int]:
    if value is None:
        return []
    ids = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(i, int) for i in ids):
        raise GenerationError(f"generate: {field} must be an int or a list of ints, got {value!r}")
    return ids


# ---------------------------------------------------------------------- the generator


@attrs.frozen
class Generation:
    """Generated token ids and how fast they came."""

    tokens: torch.Tensor
    """[batch, prompt + new] token ids (rows that ended early are padded with pad_token_id)."""
    prefill_s: float
    """Seconds of the prompt's forward (it yields the first new token)."""
    decode_s: float
    """Seconds of the decode steps (every new token after the first)."""
    new_tokens: int
    """New tokens per row, including any padding after a row's end-of-sequence token."""

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first, per second, per sequence."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


class Generator:
    """Generation with compiled prefill and decode-step graphs and a static KV cache.

    The two graphs are compiled on first use and serve every later batch, prompt length
    and cache length: they are captured from inputs of at least two rows, tokens and
    slots, so capture keeps those sizes symbolic from 1 up (the compiled model captures
    again, once, with a note, where a model fixes one). `max_len` fixes the cache length
    of every call (None: each call's prompt + new tokens, rounded up to CACHE_ALIGN);
    `batch` and `max_len` are the sizes `graph`, `empty_cache` and `full_mask` use when
    not told others. `Generator.serving` runs graphs loaded from an artifact instead."""

    def __init__(
        self, model: nn.Module, strategy=None, *, max_len: int | None = 256, batch: int = 1
    ):
        self.step: KVCacheStep | None = KVCacheStep(model)
        self.model = model
        self.strategy = strategy
        self.layout = self.step.layout()
        self.max_len = max_len
        self.batch = batch
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self._graphs: dict[str, nn.Module] = {}

    @classmethod
    def serving(cls, layout: CacheLayout, graphs: dict, *, max_len: int | None = None):
        """A Generator over already-built 'prefill' and 'decode' step graphs (a loaded
        artifact's), with caches as `layout` says, on CPU."""
        self = cls.__new__(cls)
        self.step, self.model, self.strategy = None, None, None
        self.layout, self.max_len, self.batch = layout, max_len, 1
        self.dtype, self.device = getattr(torch, layout.dtype), torch.device("cpu")
        self._graphs = dict(graphs)
        return self

    def cache_len(self, total: int) -> int:
        """Cache slots for a request of `total` tokens (prompt + new)."""
        if self.max_len is not None:
            return self.max_len
        length = -(-total // CACHE_ALIGN) * CACHE_ALIGN
        limit = self.layout.position_limit
        return min(length, limit) if limit is not None else length

    def empty_cache(self, batch: int | None = None, max_len: int | None = None):
        """Zeroed (keys, values) caches [layers, batch, kv_heads, max_len, head_dim]."""
        shapes = self.layout.cache_shapes(batch or self.batch, max_len or self.cache_len(1))
        return tuple(torch.zeros(s, dtype=self.dtype, device=self.device) for s in shapes)

    def full_mask(self, batch: int | None = None, max_len: int | None = None) -> torch.Tensor:
        """An attention mask of all real tokens [batch, max_len] (no padding)."""
        shape = (batch or self.batch, max_len or self.cache_len(1))
        return torch.ones(shape, dtype=torch.long, device=self.device)

    def graph(self, q_len: int, batch: int | None = None, max_len: int | None = None):
        """The compiled step for `q_len` new tokens: the decode graph for 1, else the prefill
        graph (one for every prompt length), built on first use."""
        kind = "decode" if q_len == 1 else "prefill"
        if kind not in self._graphs:
            if self.step is None:
                raise GenerationError(f"generate: this artifact has no {kind} graph")
            from ..compiler.capture import model_mode
            from ..compiler.compile import compile

            # Example sizes of at least 2 (export fixes a size it sees as 1, to 1): the
            # graphs then serve every batch, prompt and cache length. Under inductor the
            # request's batch stays (its graphs are this machine's, never exported): a
            # fixed row count lets lower_quantized_linears pick the GEMV kernels.
            inductor = getattr(self.strategy, "inference_backend", "fx") == "inductor"
            batch = (batch or self.batch) if inductor else max(batch or self.batch, 2)
            max_len = max(max_len or self.cache_len(q_len), CACHE_ALIGN)
            if self.layout.position_limit is not None:
                max_len = min(max_len, self.layout.position_limit)
            q_len = 1 if kind == "decode" else min(max(q_len, 2), max_len)
            keys, values = self.empty_cache(batch, max_len)
            ids = torch.zeros(batch, q_len, dtype=torch.long, device=self.device)
            pos = torch.zeros((), dtype=torch.long, device=self.device)
            example = (ids, pos, self.full_mask(batch, max_len), keys, values)
            with model_mode(self.step, training=False):  # an eval graph; the model's mode is kept
                self._graphs[kind] = compile(self.step, self.strategy, example_inputs=example)
        return self._graphs[kind]

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Generation:
        """Continue `prompt` [batch, P] (left-padded where `attention_mask` is 0) by up to
        `max_new_tokens` tokens; stops early once every row has produced an `eos_token_id`,
        after which a row gets `pad_token_id` (default: the first eos id). Without a mask,
        leading `pad_token_id`s are padding (see `prompt_mask`)."""
        _check_sampling(temperature, top_k, top_p)
        eos = _token_ids(eos_token_id, "eos_token_id")
        prompt, mask = self._check_request(
            prompt, max_new_tokens, attention_mask, pad_token_id, eos
        )
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=self.device)
        batch, length = prompt.shape[0], self.cache_len(prompt.shape[1] + max_new_tokens)
        prefill = self.graph(prompt.shape[1], batch, length)
        decode = self.graph(1, batch, length)
        keys, values = self.empty_cache(batch, length)
        slots = self.full_mask(batch, length)
        slots[:, : prompt.shape[1]] = mask
        unfinished = torch.ones(batch, 1, dtype=torch.bool, device=self.device)
        tokens, ids, pos = [prompt], prompt, 0
        start = time.perf_counter()
        decode_start = None
        for step in range(max_new_tokens):
            graph = prefill if step == 0 else decode
            at = torch.tensor(pos, device=self.device)
            logits, new_k, new_v = graph(ids, at, slots, keys, values)
            q_len = ids.shape[1]
            keys[:, :, :, pos : pos + q_len] = new_k
            values[:, :, :, pos : pos + q_len] = new_v
            pos += q_len
            ids = next_tokens(logits, temperature, top_k, top_p, generator)
            ids = torch.where(unfinished, ids, pad)
            tokens.append(ids)
            if step == 0:
                decode_start = time.perf_counter()
            if eos:
                unfinished &= ~torch.isin(ids, eos_ids)
                if not unfinished.any():
                    break
        end = time.perf_counter()
        decode_start = decode_start or end
        return Generation(
            tokens=torch.cat(tokens, dim=1),
            prefill_s=decode_start - start,
            decode_s=end - decode_start,
            new_tokens=len(tokens) - 1,
        )

    def _check_request(self, prompt, max_new_tokens, attention_mask, pad_token_id, eos):
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long:
            got = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise GenerationError(
                f"generate: input_ids must be int64 token ids [batch, length], got {got}"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(
                f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}"
            )
        self.layout.check_length(prompt.shape[1], max_new_tokens)
        total = prompt.shape[1] + max_new_tokens
        if self.max_len is not None and total > self.max_len:
            raise GenerationError(
                f"generate: prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = "
                f"{total} exceeds max_len={self.max_len}; build the Generator with a larger max_len."
            )
        prompt = prompt.to(self.device)
        return prompt, prompt_mask(prompt, attention_mask, pad_token_id, eos)


def prompt_mask(
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pad_token_id: int | None,
    eos: Sequence[int] = (),
) -> torch.Tensor:
    """The prompt's slot mask [batch, P] (1 = token, 0 = left padding).

    Given a mask, it must mark left padding. Without one, as transformers' generate: leading
    `pad_token_id`s are padding when that id is no eos id; rows that end in it are right
    padding, refused. When the pad id is unknown or an eos id, rows that start with runs of
    an eos id (the usual pad of such models) of different lengths look padded and are
    refused too (a mask is then the only way to tell): never silently attended to."""
    if attention_mask is not None:
        if attention_mask.shape != prompt.shape:
            raise GenerationError(
                f"generate: attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                f"{tuple(prompt.shape)}; they must match."
            )
        mask = attention_mask.to(device=prompt.device, dtype=torch.long)
        if not bool((mask[:, -1] == 1).all()) or bool((mask.diff(dim=1) < 0).any()):
            raise GenerationError(
                "generate: attention_mask must mark left padding (zeros before each row's "
                "tokens, ones after, the last column all ones); pad prompts on the left "
                "(tokenizer.padding_side = 'left')."
            )
        return mask
    if pad_token_id is not None and pad_token_id not in eos:
        is_pad = prompt == pad_token_id
        mask = (~is_pad).long().cummax(dim=1).values  # 0 on each row's leading pads
        if bool(is_pad[:, -1].any()):
            raise GenerationError(
                f"generate: a prompt row ends with pad_token_id={pad_token_id} (right padding); "
                "pad prompts on the left (tokenizer.padding_side = 'left') or pass attention_mask."
            )
        return mask
    for token in eos:
        leading = (prompt != token).long().cummax(dim=1).values.eq(0).sum(dim=1)
        if prompt.shape[0] > 1 and bool((leading != leading[0]).any()):
            raise GenerationError(
                f"generate: prompt rows start with different numbers of token {token} (an eos "
                f"id, the usual padding of this model: {leading.tolist()} per row), and no "
                "attention_mask says whether that is padding; pass attention_mask (the "
                "tokenizer returns it with padding=True), or a pad_token_id that is no eos id."
            )
    return torch.ones_like(prompt)


# ---------------------------------------------------------------------- compiled.generate


def generate(
    compiled,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    **options,
) -> torch.Tensor:
    """`compiled.generate`: token ids [batch, prompt + new] continuing `input_ids`; options
    as `run_generation`, eos/pad ids defaulting to the model's `generation_config`."""
    model = compiled.model
    check_causal_lm(model)
    config = getattr(model, "generation_config", None)
    defaults = {
        "eos_token_id": getattr(config, "eos_token_id", None),
        "pad_token_id": getattr(config, "pad_token_id", None),
    }
    return run_generation(
        compiled, generator_for(compiled), defaults, input_ids, max_new_tokens, **options
    )


def run_generation(
    owner,
    runner: Generator,
    defaults: dict,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Token ids [batch, prompt + new] continuing `input_ids` through `runner`; the
    Generation lands on `owner.last_generation`.

    eos/pad ids default to `defaults` (the model's `generation_config`), as transformers'
    `generate`; pass `eos_token_id=[]` to always produce `max_new_tokens`. Prompts of
    different lengths are left-padded, with `attention_mask` (or leading pad ids, see
    `prompt_mask`). Sampling (temperature > 0) draws from `generator`, or from a fresh one
    seeded with `seed`, else torch's default.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise GenerationError(
            "generate: input_ids must be a [batch, length] tensor of token ids, got "
            f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(
            f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}"
        )
    runner.layout.check_length(input_ids.shape[1], max_new_tokens)
    if eos_token_id is None:
        eos_token_id = defaults.get("eos_token_id")
    if pad_token_id is None:
        pad_token_id = defaults.get("pad_token_id")
    if seed is not None:
        if generator is not None:
            raise GenerationError("generate: pass either generator or seed, not both")
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    result = runner.generate(
        input_ids,
        max_new_tokens,
        attention_mask=attention_mask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        generator=generator,
    )
    vars(owner)["last_generation"] = result
    return result.tokens


def generator_for(compiled) -> Generator:
    """The compiled model's Generator (built on its first generate call)."""
    runner = vars(compiled).get("_generator")
    if runner is None:
        runner = Generator(compiled.model, _serving_strategy(compiled.strategy), max_len=None)
        vars(compiled)["_generator"] = runner
    return runner


def _serving_strategy(strategy):
    """The strategy's inference part: a training strategy (optimizer, ZeRO...) generates
    with its model's weights as they are, through the same graph passes and backend."""
    if strategy is None or strategy.optimizer is None:
        return strategy
    from ..compiler.strategy import Strategy

    return Strategy(
        passes=strategy.passes,
        disable=strategy.disable,
        fuse=strategy.fuse,
        quantize=strategy.quantize,
        inference_backend=strategy.inference_backend,
    )
