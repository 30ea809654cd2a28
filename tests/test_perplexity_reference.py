"""Perplexity of stories260K on TinyStories text (the first 100k characters: 91 windows of 512 and a partial one)
agrees with transformers on the same checkpoint."""

import math

import numpy as np
import torch
import transformers

import llmkit
from llmkit.checkpoint import save_hf
from llmkit.evaluate import encode, score_ids, windows


def test_stories260k_perplexity_matches_transformers(shared_data, tmp_path):
    d = shared_data / "stories260K"
    llm = llmkit.load(d / "stories260K.bin", d / "tok512.bin")
    text = (shared_data / "tinystories" / "tinystories_valid_head.txt").read_text()[:100_000]  # 46.7k tokens
    ids = torch.from_numpy(encode(text, llm.tokenizer).astype(np.int64))  # what llmkit.perplexity scores
    ours = score_ids(llm.model, ids, 512, progress=False)

    save_hf(llm.model, tmp_path / "hf")  # the same weights in Hugging Face format
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    full = [w for w in windows(ids, 512) if len(w) == 512]
    batches = [torch.stack(full[i : i + 32]) for i in range(0, len(full), 32)]
    batches += [w[None] for w in windows(ids, 512) if len(w) < 512]
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:  # transformers' own shifted cross-entropy (mean over the batch's predictions)
            count = batch[:, 1:].numel()
            nll, n = nll + hf(input_ids=batch, labels=batch).loss.item() * count, n + count
    theirs = math.exp(nll / n)
    assert ours.n_tokens == n > 40_000
    assert len(full) >= 64 and 1 < len(batches[-1][0]) < 512  # two full batches and a partial last window
    assert abs(ours.value - theirs) / theirs < 1e-3, (ours.value, theirs)
