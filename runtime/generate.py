"""KV-cache text generation: the Generator's prefill/decode loop, token choice, compiled.generate.

The graphs it runs are runtime/kv_cache.py's `KVCacheStep`, compiled for prefill and decode
through the strategy's passes, then by default to native code (runtime/compiled_code.py:
AOTInductor packages cached on disk; where that fails, a warning and the portable graphs).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import attrs
import torch
import torch.nn as nn

from . import tensor_parallel
from .kv_cache import CacheLayout, GenerationError, KVCacheStep, check_causal_lm

CACHE_ALIGN = 64
"""A Generator without a fixed max_len sizes each call's caches to prompt + new tokens
rounded up to this (at most the model's position table)."""


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
    not told others. `Generator.serving` runs graphs loaded from an artifact instead.

    `compiled_code` (None: the strategy's `compiled_code`, else $STRATO_COMPILED_CODE):
    generate runs the two graphs as ahead-of-time compiled code (runtime/compiled_code.py),
    or, False, as the portable FX graphs."""

    def __init__(
        self,
        model: nn.Module,
        strategy=None,
        *,
        max_len: int | None = 256,
        batch: int = 1,
        compiled_code: bool | None = None,
    ):
        self.step: KVCacheStep | None = KVCacheStep(model)
        self.model = model
        self.strategy = strategy
        self.capture_layout = self.step.layout()
        """The caches as capture sees them: the whole model's KV heads."""
        tensor_parallel = getattr(strategy, "tensor_parallel", None)
        self.layout = self.capture_layout.per_rank(tensor_parallel.size if tensor_parallel else 1)
        """The caches this rank holds (tensor parallelism: its share of the KV heads)."""
        self.max_len = max_len
        self.batch = batch
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self._graphs: dict[str, nn.Module] = {}
        if compiled_code is None:
            compiled_code = getattr(strategy, "compiled_code", None)
        if compiled_code is None:
            from .compiled_code import enabled_by_default

            compiled_code = enabled_by_default()
        self.compiled_code = compiled_code
        """Whether generate runs compiled step code (where it applies, see compiled_steps)."""
        self._compiled: dict | None = None

    @classmethod
    def serving(cls, layout: CacheLayout, graphs: dict, *, max_len: int | None = None):
        """A Generator over already-built 'prefill' and 'decode' step graphs (a loaded
        artifact's), with caches as `layout` says, on CPU."""
        self = cls.__new__(cls)
        self.step, self.model, self.strategy = None, None, None
        self.layout, self.max_len, self.batch = layout, max_len, 1
        self.capture_layout = layout
        self.dtype, self.device = getattr(torch, layout.dtype), torch.device("cpu")
        self._graphs = dict(graphs)
        self.compiled_code, self._compiled = False, {}  # the loaded graphs run what they run
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
            keys, values = (
                torch.zeros(shape, dtype=self.dtype, device=self.device)
                for shape in self.capture_layout.cache_shapes(batch, max_len)
            )
            ids = torch.zeros(batch, q_len, dtype=torch.long, device=self.device)
            pos = torch.zeros((), dtype=torch.long, device=self.device)
            example = (ids, pos, self.full_mask(batch, max_len), keys, values)
            with model_mode(self.step, training=False):  # an eval graph; the model's mode is kept
                self._graphs[kind] = compile(self.step, self.strategy, example_inputs=example)
        return self._graphs[kind]

    def compiled_steps(self) -> dict:
        """The ahead-of-time compiled prefill and decode steps by kind, built (or loaded from
        the on-disk cache) on first use; {} where compiled code is off or does not apply, or
        compiling failed (a warning said why, once: this Generator then keeps the portable
        graphs)."""
        if self._compiled is not None:
            return self._compiled
        self._compiled = {}
        if not self.compiled_code:
            return self._compiled
        from .compiled_code import CompiledCodeError, compile_steps, unsupported_reason

        if unsupported_reason(self.strategy, self.device) is not None:
            return self._compiled
        graphs = {"prefill": self.graph(2), "decode": self.graph(1)}
        try:
            self._compiled = compile_steps(
                {kind: g._graph_for(False).gm for kind, g in graphs.items()}, self.layout
            )
        except CompiledCodeError as exc:
            warnings.warn(
                f"strato: generate serves the portable step graphs: {exc}. "
                "Strategy(compiled_code=False) skips compiling.",
                RuntimeWarning,
                stacklevel=4,
            )
        return self._compiled

    def steps(self, q_len: int, batch: int, max_len: int):
        """What runs the prefill of `q_len` tokens and the decode step: compiled code where
        there is some (`compiled_steps`), else the graphs."""
        compiled = self.compiled_steps()
        if compiled:
            return compiled["prefill"], compiled["decode"]
        return self.graph(q_len, batch, max_len), self.graph(1, batch, max_len)

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
        prefill, decode = self.steps(prompt.shape[1], batch, length)
        tensor_parallel.check_generate_request(
            prefill, prompt, mask, max_new_tokens, temperature, top_k, top_p, eos, generator
        )
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
            with tensor_parallel.inputs_checked():  # the request was, once
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
        compiled_code=strategy.compiled_code,
        tensor_parallel=strategy.tensor_parallel,
    )
