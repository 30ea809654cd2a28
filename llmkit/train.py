"""Train the kit's default model, pydoc-lm, from the prose that ships with Python.

Two stages, so the corpus (which depends on the Python that builds it) can be made on one
machine and the model trained on another (a GPU):

    prepare: corpus -> SentencePiece BPE tokenizer -> token ids (.npy) + corpus.json
    fit:     token ids -> Llama model (AdamW, warm-up + cosine decay) -> Hugging Face folder

    llmkit train --out data/pydoc-lm --force              # both, here (--force: replace the shipped folder)
    llmkit train prepare --work .gpu                      # stage 1 only
    llmkit train --data .gpu --out OUT --device cuda      # stage 2 from stage 1's folder
"""

import dataclasses
import io
import json
import math
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmkit import data
from llmkit.checkpoint import write_hf
from llmkit.errors import LLMKitError
from llmkit.evaluate import score_ids, unigram_perplexity_of_ids
from llmkit.files import check_output_path, write_file_atomically, write_folder_atomically
from llmkit.model import ModelArgs, Transformer
from llmkit.tokenizer import load_tokenizer

PRESETS = {  # vocab_size is taken from the tokenizer
    "default": ModelArgs(dim=256, n_layers=8, n_heads=8, n_kv_heads=2, hidden_dim=768, max_seq_len=512,
                         tie_embeddings=True),
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192, max_seq_len=128,
                      tie_embeddings=True),
    # speculative decoding's draft for the default model: same context, an eighth of its parameters
    "draft": ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=384, max_seq_len=512,
                       tie_embeddings=True),
}  # fmt: skip
EVAL_SEQ_LEN = 256  # the window `llmkit eval` uses by default, so the card's number is what learners see


@dataclass
class TrainConfig:
    steps: int = 300  # ~12 passes over the corpus: the held-out loss rises after that, as the model memorises
    batch_size: int = 32
    seq_len: int = 512
    lr: float = 2e-3  # peak, after warm-up
    min_lr: float = 1e-4  # end of the cosine decay
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    device: str = "cpu"
    eval_every: int = 100  # steps between held-out perplexity readings (0: only at the end)


# ---- stage 1: corpus, tokenizer, token ids ------------------------------------------------------


def train_tokenizer(text: str, path: Path, vocab_size: int = 4096) -> Path:
    """A Llama-style SentencePiece BPE model: unknown characters fall back to bytes, digits split,
    text kept as is. One thread and no sampling, so the same text gives the same file."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(data.paragraphs(text)), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, character_coverage=0.9999,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 16,
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    return write_file_atomically(path, lambda tmp: Path(tmp).write_bytes(model.getvalue()))


def prepare_corpus(work: Path, vocab_size: int = 4096, tokenizer_path: Path | None = None,
                   force: bool = False) -> dict:  # fmt: skip
    """Build the corpus, train the tokenizer on the training split and save both splits as token ids.

    With `tokenizer_path` that SentencePiece model is used instead of a new one: a draft model for speculative
    decoding must share its target's tokens, whichever Python builds its corpus.
    """
    if (work / "corpus.json").exists() and not force:  # a corpus prepared before, maybe with other settings
        raise LLMKitError(f"{work} already holds a prepared corpus; choose another folder or pass --force "
                          "(force=True) to replace it")  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    train_docs, heldout_docs = data.split(data.build_corpus())
    if tokenizer_path is None:
        tokenizer = load_tokenizer(train_tokenizer(data.join(train_docs), work / "tokenizer.model", vocab_size))
    else:  # loaded first, so a missing or broken file is a one-line error
        if load_tokenizer(tokenizer_path).kind != "sentencepiece":
            raise LLMKitError(f"{tokenizer_path} is not a SentencePiece model; the kit's models ship tokenizer.model")
        if Path(tokenizer_path).resolve() != (work / "tokenizer.model").resolve():
            write_file_atomically(work / "tokenizer.model", lambda tmp: shutil.copyfile(tokenizer_path, tmp))
        tokenizer = load_tokenizer(work / "tokenizer.model")
    train_ids = data.encode(data.join(train_docs), tokenizer)
    heldout_ids = data.encode(data.join(heldout_docs), tokenizer)
    for name, ids in (("train.npy", train_ids), ("heldout.npy", heldout_ids)):
        write_file_atomically(work / name, lambda tmp, ids=ids: np.save(tmp, ids))
    stats = {
        "python": platform.python_version(),
        "vocab_size": tokenizer.vocab_size,
        "train": dataclasses.asdict(data.corpus_size(train_docs, tokenizer)),
        "heldout": dataclasses.asdict(data.corpus_size(heldout_docs, tokenizer)),
        "unigram_perplexity": unigram_perplexity_of_ids(train_ids, heldout_ids, tokenizer.vocab_size).value,
        "bos_id": tokenizer.bos_id,
        "eos_ids": list(tokenizer.eos_ids),
    }
    write_file_atomically(work / "corpus.json", lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=2) + "\n"))
    return stats


# ---- stage 2: the model -------------------------------------------------------------------------


def init_weights(model: Transformer) -> None:
    """GPT-2's scheme: N(0, 0.02) everywhere, and the projections that add into the residual stream
    scaled down by sqrt(2 * n_layers) so the stream's variance does not grow with depth."""
    residual_std = 0.02 / math.sqrt(2 * model.args.n_layers)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def optimizer_for(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays the matrices only: norm gains are left alone, as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=cfg.device.startswith("cuda"))


def random_batch(ids: Tensor, cfg: TrainConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """batch_size windows of seq_len + 1 tokens at random offsets: inputs and next-token targets."""
    starts = torch.randint(len(ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    rows = torch.stack([ids[s : s + cfg.seq_len + 1] for s in starts.tolist()]).to(cfg.device)
    return rows[:, :-1], rows[:, 1:]


def fit(args: ModelArgs, train_ids: np.ndarray, cfg: TrainConfig, eval_ids: np.ndarray | None = None):
    """Train a fresh model; returns it (float32 weights) and the history of (step, loss, eval perplexity)."""
    torch.manual_seed(cfg.seed)
    model = Transformer(args)
    init_weights(model)
    model.to(cfg.device).train()
    ids = torch.from_numpy(train_ids.astype(np.int64))
    held = torch.from_numpy(eval_ids.astype(np.int64)) if eval_ids is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = optimizer_for(model, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.device.startswith("cuda"))
    history = []
    bar = tqdm(range(cfg.steps), desc="train", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = random_batch(ids, cfg, gen)
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        last = step == cfg.steps - 1
        if step % 10 == 0 or last:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step, cfg):.2e}", refresh=False)
        if held is not None and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            model.eval()
            with autocast:
                ppl = score_ids(model, held, min(EVAL_SEQ_LEN, args.max_seq_len), cfg.device, progress=False)
            model.train()
            history.append((step + 1, loss.item(), ppl.value))
            tqdm.write(f"step {step + 1}: loss {loss.item():.3f}, held-out perplexity {ppl.value:.2f}")
    return model.eval(), history


@torch.no_grad()
def round_to_bf16(model: Transformer) -> None:
    """Round the float32 weights to what bfloat16 storage keeps, so evaluation sees the shipped model
    (the RoPE tables, which are rebuilt in float32 at load time, are left alone)."""
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16))


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


# ---- output: the model folder and its card ------------------------------------------------------


MODEL_CARD = """\
# {name}

{role}: a {params_m:.1f}M-parameter Llama-architecture model trained by the kit
(`llmkit/train.py`) on English prose that ships with every CPython installation. It writes text in
the style of Python's documentation and docstrings; it knows no facts beyond that, and is made for
learning how inference works, offline.

## Files

| file | what | size |
| --- | --- | --- |
{files}

Hugging Face layout (`LlamaForCausalLM`): `transformers` loads it with `from_pretrained`, and
`llmkit.load("{load_name}")` loads it.

## Model

dim {dim}, {n_layers} layers, {n_heads} heads ({n_kv_heads} key/value heads, grouped-query attention),
SwiGLU hidden width {hidden_dim}, vocabulary {vocab_size}, tied input/output embeddings, RoPE
(theta {rope_theta:g}), context {max_seq_len} tokens. {params} parameters, stored in bfloat16.

## Corpus

Built at run time by `llmkit.data.build_corpus()` from Python {python}: the documentation topics of
`pydoc_data.topics` and the docstrings of the importable public standard-library modules, classes
and functions, with doctest examples removed, one paragraph per line. Documents whose
`crc32(name) % 100 < {heldout_percent}` are held out for evaluation.

| split | documents | paragraphs | characters | tokens |
| --- | --- | --- | --- | --- |
| train | {train[documents]} | {train[paragraphs]} | {train[chars]:,} | {train[tokens]:,} |
| held out | {heldout[documents]} | {heldout[paragraphs]} | {heldout[chars]:,} | {heldout[tokens]:,} |

Tokenizer: SentencePiece BPE, {vocab_size} pieces, byte fallback, digits split, trained on the
training split. Each paragraph is encoded as BOS + its tokens; paragraphs are concatenated (no EOS),
so the model ends a paragraph by predicting BOS.

## Training

{steps} steps of {batch_size} random windows of {seq_len} tokens ({tokens_seen:,} tokens, about
{epochs:.0f} passes over the training split), AdamW (betas 0.9, 0.95, weight decay {weight_decay} on
matrices), learning rate warmed up linearly over {warmup} steps to {lr:g}, then cosine-decayed to
{min_lr:g}; gradients clipped at {grad_clip}; seed {seed}; bfloat16 autocast on CUDA. {choice}
Training took {train_s:.0f} s on {device}, with:

    {command}

after `llmkit train prepare --work DIR` made the tokenizer and token ids with Python
{python}, or the command did both in one go.

## Evaluation

Held-out perplexity (windows of {eval_seq_len} tokens, bfloat16 weights computed in float32):
**{ppl:.2f}** over {eval_tokens:,} tokens. An add-one smoothed unigram model fitted on the training
split scores {unigram:.1f} on the same text: {ratio:.1f} times higher. Reproduce with `{eval_command}`.

## Licence

The training text is taken from CPython's documentation and source, Copyright © Python Software
Foundation, under the PSF License Agreement (https://docs.python.org/3/license.html). The weights
are derived from that text and are distributed under the same terms.
"""


# What each preset is, and why its settings are what they are: the first words and the training section of its card.
ROLES = {
    "default": ("llmkit's own default model",
                "The number of steps and the peak learning rate were chosen by a small sweep scored on the last 5% of "
                "the training\ntokens (not on the held-out text): the corpus is small, and with more steps the model "
                "memorises it\nand its perplexity on unseen text rises."),
    "draft": ("The draft model for speculative decoding with llmkit's default model, pydoc-lm, whose corpus and\n"
              "tokenizer it shares (`llmkit generate --draft-checkpoint-path`)",
              "It is trained briefly, on the CPU: a draft only has to guess the\ntarget's easy tokens, and its cost "
              "per token is what speculative decoding pays for each guess."),
    "tiny": ("A tiny model for tests", "The settings are the tests' own."),
}  # fmt: skip


def model_card(model: Transformer, stats: dict, cfg: TrainConfig, run: dict) -> str:
    """The model card; `run` holds the run's figures and its `out` folder and `preset` name."""
    args = model.args
    role, choice = ROLES[run["preset"]]
    out = Path(run["out"])
    is_default = out.resolve() == Path(__file__).resolve().parents[1] / "data" / "pydoc-lm"
    load_name = "default" if is_default else str(out)
    params = sum(p.numel() for p in model.parameters())
    tokens_seen = cfg.steps * cfg.batch_size * cfg.seq_len
    fields = {**stats, **dataclasses.asdict(cfg), **dataclasses.asdict(args), **run}  # args' vocab_size wins
    return MODEL_CARD.format(
        **fields, params_m=params / 1e6, params=f"{params:,}", heldout_percent=data.HELDOUT_PERCENT,
        tokens_seen=tokens_seen, epochs=tokens_seen / stats["train"]["tokens"],
        unigram=stats["unigram_perplexity"], ratio=stats["unigram_perplexity"] / run["ppl"], name=out.name,
        role=role, choice=choice, load_name=load_name,
        eval_command="llmkit eval" + ("" if is_default else f" --checkpoint-path {out}"),
    )  # fmt: skip


FILE_ROLES = {
    "config.json": "architecture, for transformers and llmkit",
    "model.safetensors": "weights, bfloat16, Hugging Face names",
    "tokenizer.model": "SentencePiece tokenizer",
}


def file_table(folder: Path) -> str:
    sizes = {name: (folder / name).stat().st_size for name in FILE_ROLES}
    return "\n".join(f"| `{name}` | {role} | {sizes[name]:,} bytes |" for name, role in FILE_ROLES.items())


def write_model(model: Transformer, work: Path, out: Path, stats: dict, cfg: TrainConfig, run: dict) -> Path:
    """The model folder with its card, built beside `out` and renamed into place (replacing it)."""
    out.parent.mkdir(parents=True, exist_ok=True)

    def fill(folder: Path) -> None:
        write_hf(model, folder, tokenizer_path=work / "tokenizer.model", bos_id=stats["bos_id"],
                 eos_ids=stats["eos_ids"])  # fmt: skip
        card = model_card(model, stats, cfg, {**run, "files": file_table(folder)})
        (folder / "README.md").write_text(card)

    return write_folder_atomically(out, fill)


def train_from(work: Path, out: Path, preset: str, cfg: TrainConfig, command: str, force: bool = False) -> dict:
    """Stage 2: train on prepared token ids, measure held-out perplexity and write the model folder, which may
    replace an existing one only with `force` (refused before training)."""
    check_output_path(out, force, folder=True)
    stats = json.loads((work / "corpus.json").read_text())
    args = dataclasses.replace(PRESETS[preset], vocab_size=stats["vocab_size"])
    train_ids, heldout_ids = np.load(work / "train.npy"), np.load(work / "heldout.npy")
    start = time.perf_counter()
    model, history = fit(args, train_ids, cfg, heldout_ids if cfg.eval_every else None)
    train_s = time.perf_counter() - start
    round_to_bf16(model)
    ids = torch.from_numpy(heldout_ids.astype(np.int64))
    eval_seq_len = min(EVAL_SEQ_LEN, args.max_seq_len)
    ppl = score_ids(model, ids, eval_seq_len, cfg.device)
    run = {"train_s": train_s, "device": device_name(cfg.device), "command": command, "out": str(out),
           "preset": preset, "ppl": ppl.value, "eval_tokens": ppl.n_tokens, "eval_seq_len": eval_seq_len}  # fmt: skip
    write_model(model.to(device="cpu", dtype=torch.bfloat16), work, out, stats, cfg, run)
    return {**run, "history": history, "unigram": stats["unigram_perplexity"]}


def make_model(out: Path, preset: str, cfg: TrainConfig, vocab_size: int, command: str, prepared: Path | None = None,
               tokenizer_path: Path | None = None, force: bool = False) -> dict:  # fmt: skip
    """Both stages: prepare the corpus in a scratch folder (or use `prepared`), then train into `out`, which may
    replace an existing folder only with `force` (refused before the slow work, not after it)."""
    check_output_path(out, force, folder=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = prepared or Path(scratch)
        if prepared is None:
            prepare_corpus(work, vocab_size, tokenizer_path)
        return train_from(work, out, preset, cfg, command, force)
