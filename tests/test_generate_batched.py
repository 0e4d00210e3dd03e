"""Batched generation of prompts of different lengths, in process and from an artifact.

The oracle is each prompt generated alone: with left padding (an attention mask, or leading
pad ids), every row of a batch equals its single-prompt generation token for token (fp32,
greedy), on tiny Hugging Face Llama and GPT-2 configs, through `compiled.generate` and
through `strato.load(path).generate` in a fresh process. One artifact serves every batch
size and prompt length up to the model's position table; a size outside gets an error
stating the range. Padding nobody marked is refused, never silently attended to.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import strato
from strato.compiler.errors import InputError
from strato.runtime.generate import GenerationError

tf = pytest.importorskip("transformers")

VOCAB = 100
LIMIT = 64  # the models' position tables
PAD = 0


def causal_lm(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=LIMIT)
        return tf.GPT2LMHeadModel(config).eval()
    config = tf.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=LIMIT,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def prompts(lengths) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(3, VOCAB, (1, n), generator=g) for n in lengths]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1] :] = row[0]
        mask[i, width - row.shape[1] :] = 1
    return ids, mask


def compiled_lm(model):
    ids = torch.randint(3, VOCAB, (1, 8))  # batch 1: the artifact must still serve others
    return strato.compile(model, example_kwargs={"input_ids": ids, "use_cache": False})


def assert_rows_equal_single(batched, rows, singles, new):
    width = batched.shape[1] - new
    for i, (row, single) in enumerate(zip(rows, singles)):
        assert torch.equal(batched[i, width:], single[0, row.shape[1] :]), f"row {i}"


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_each_row_equals_its_single_prompt_generation(family):
    model = causal_lm(family)
    compiled = compiled_lm(model)
    rows = prompts((3, 9, 6, 1))
    new = 7
    singles = [compiled.generate(r, new, eos_token_id=[]) for r in rows]
    ids, mask = left_pad(rows)
    batched = compiled.generate(ids, new, attention_mask=mask, eos_token_id=[])
    assert_rows_equal_single(batched, rows, singles, new)
    # Without a mask, leading pad ids (a pad id that is no eos id) are the padding.
    by_pad = compiled.generate(ids, new, pad_token_id=PAD, eos_token_id=[])
    assert torch.equal(by_pad, batched)
    # Not trivially true: attending to the pads changes the padded rows.
    unmasked = compiled.generate(ids, new, eos_token_id=[], attention_mask=torch.ones_like(ids))
    assert not torch.equal(unmasked, batched)


def test_unmarked_padding_is_refused():
    model = causal_lm("gpt2")
    compiled = compiled_lm(model)
    eos = model.generation_config.eos_token_id
    rows = [torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10]])]
    ids = torch.tensor([[5, 6, 7, 8], [eos, eos, 9, 10]])  # padded with eos, no mask, no pad id
    with pytest.raises(GenerationError, match=r"attention_mask.*pad_token_id"):
        compiled.generate(ids, 3)
    right = torch.tensor([[5, 6, 7, 8], [9, 10, PAD, PAD]])
    with pytest.raises(GenerationError, match="right padding"):
        compiled.generate(right, 3, pad_token_id=PAD)
    assert rows  # (the rows the two requests stand for)


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory):
    """A Llama compiled from a batch-1 example, exported with its step graphs."""
    model = causal_lm("llama")
    compiled = compiled_lm(model)
    path = tmp_path_factory.mktemp("generate") / "llama.strato"
    strato.export(compiled, path)
    return model, compiled, path


def test_artifact_generates_batched_in_a_fresh_process(llama_artifact, tmp_path):
    model, compiled, path = llama_artifact
    rows = prompts((5, 2, 11))
    ids, mask = left_pad(rows)
    single = rows[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the fresh process
    try:
        want = compiled.generate(ids, 6, attention_mask=mask, eos_token_id=[])
        want_single = compiled.generate(single, 6, eos_token_id=[])
    finally:
        torch.set_num_threads(threads)
    save_file({"ids": ids, "mask": mask, "single": single}, tmp_path / "in.safetensors")
    script = (
        "import sys, torch, strato\n"
        "from safetensors.torch import load_file, save_file\n"
        "torch.set_num_threads(1)\n"
        "served = strato.load(sys.argv[1])\n"
        "x = load_file(sys.argv[2])\n"
        "out = served.generate(x['ids'], 6, attention_mask=x['mask'], eos_token_id=[])\n"
        "one = served.generate(x['single'], 6, eos_token_id=[])\n"
        "save_file({'batched': out, 'single': one}, sys.argv[3])\n"
        "assert 'transformers' not in sys.modules, 'loading imported transformers'\n"
    )
    out = tmp_path / "out.safetensors"
    subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "in.safetensors"), str(out)],
        check=True,
        cwd=tmp_path,
        timeout=240,
    )
    got = load_file(out)
    assert torch.equal(got["batched"], want)
    assert torch.equal(got["single"], want_single)
    assert_rows_equal_single(got["batched"], rows, [want_single], 6)


def test_one_artifact_serves_every_shape_within_its_stated_range(llama_artifact):
    model, compiled, path = llama_artifact
    served = strato.load(path)
    inputs = {spec["name"]: spec for spec in served.inputs}
    assert inputs["input_ids"]["shape"] == [None, None]  # the example was [1, 8]
    assert inputs["input_ids"]["range"] == [[1, None], [1, LIMIT]]
    step = {spec["name"]: spec for spec in served.steps["prefill"].inputs}
    assert step["ids"]["range"][0] == [1, None] and step["ids"]["range"][1][1] == LIMIT
    assert step["keys"]["range"][3][1] == LIMIT
    for batch, length in [(1, 3), (4, 12), (2, 1)]:
        ids = torch.randint(3, VOCAB, (batch, length))
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
        got = served(input_ids=ids, use_cache=False)["logits"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        new = served.generate(ids, 3, eos_token_id=[])
        assert torch.equal(new, compiled.generate(ids, 3, eos_token_id=[]))
    too_long = torch.randint(3, VOCAB, (1, LIMIT + 1))
    with pytest.raises(InputError, match=rf"input 'input_ids' must be int64\[.*\.\.{LIMIT}\]"):
        served(input_ids=too_long, use_cache=False)
    with pytest.raises(GenerationError, match=f"= {LIMIT}"):
        served.generate(too_long[:, :60], 10)
