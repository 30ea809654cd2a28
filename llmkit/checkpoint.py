"""Load llama2.c, Hugging Face and Meta checkpoints into `llmkit.model.Transformer`, and save.

The kit's own format is the Hugging Face layout (`config.json` + `model.safetensors` + the
tokenizer file), so what it saves it loads, and transformers loads it too.

RoPE comes in two layouts: llama2.c and Meta rotate interleaved pairs (0,1), (2,3)...; Hugging
Face files rotate halves (i, i + d/2). The model uses halves, so q and k weights from llama2.c and
Meta files are permuted once at load time and one forward serves both.
"""

import json
import pickle
import shutil
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmkit.errors import LLMKitError, first_line
from llmkit.files import check_output_path, read_json_object, write_folder_atomically
from llmkit.model import ModelArgs, Transformer

LLAMA2C_HEADER = struct.Struct("7i")

# our parameter name -> Hugging Face name, per layer and global
HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
HF_GLOBAL_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from interleaved-pair RoPE to halves RoPE."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from halves RoPE back to interleaved pairs (the inverse)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def load_checkpoint(path: str | Path, max_seq_len: int | None = None) -> Transformer:
    """Build a model from any supported checkpoint: a file or a folder."""
    path = Path(path)
    if not path.exists():
        raise LLMKitError(f"checkpoint not found: {path} (check the path, or use --model with an alias)")
    if path.is_dir():
        if (path / "config.json").exists():
            return load_hf(path, max_seq_len)
        if (path / "params.json").exists():
            return load_meta(path, max_seq_len)
        bins = sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
        if len(bins) == 1:
            return load_llama2c(bins[0], max_seq_len)
        raise LLMKitError(
            f"{path} holds no checkpoint I know: expected config.json + model.safetensors (Hugging Face), "
            "params.json + consolidated.*.pth (Meta) or one llama2.c .bin"
        )
    if path.suffix == ".bin":
        return load_llama2c(path, max_seq_len)
    if path.suffix == ".pth":
        return load_meta(path.parent, max_seq_len)
    if path.suffix == ".safetensors" or path.name == "config.json":
        return load_hf(path.parent, max_seq_len)
    raise LLMKitError(f"{path}: unknown checkpoint type; give a llama2.c .bin, a .pth or a model folder")


def build_model(args: ModelArgs, state: dict, path: Path) -> Transformer:
    """The model of args holding the weights of state (our names; wq, wk and wv apart), or one clear error."""
    layers = 1 + max((int(name.split(".")[1]) for name in state if name.startswith("layers.")), default=-1)
    if layers != args.n_layers:  # before building: a config's typo of 100000 layers would take minutes to build
        raise LLMKitError(f"{path}: its config says {args.n_layers} layers but its weights hold {layers}; "
                          "the config or the weights are from another model")  # fmt: skip
    with torch.device("meta"):
        model = Transformer(args)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise LLMKitError(f"{path}: weights do not fit the model described by its config ({' '.join(first)})") from None
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.setup_buffers()  # the rope tables, mask and caches were built on the meta device
    return model.eval()


# ---- llama2.c -------------------------------------------------------------------------------


def load_llama2c(path: Path, max_seq_len: int | None = None) -> Transformer:
    """llama2.c's version-0 .bin: a header of seven int32, then float32 tensors (see run.c)."""
    raw = path.read_bytes()
    if len(raw) < LLAMA2C_HEADER.size:
        raise LLMKitError(f"{path}: too short to be a llama2.c checkpoint (truncated download?)")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = LLAMA2C_HEADER.unpack_from(raw)
    if dim == 0x616B3432:  # "ak42": llama2.c's version 1/2 export
        raise LLMKitError(f"{path}: llama2.c version 1/2 export; export it with --version 0 (legacy)")
    shared = vocab_size > 0
    vocab_size = abs(vocab_size)
    if not (0 < n_kv_heads <= n_heads <= dim and 0 < n_layers < 1000 and 0 < seq_len and hidden_dim > 0):
        raise LLMKitError(f"{path}: not a llama2.c checkpoint (header makes no sense: {dim=} {n_heads=})")
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    sizes = {
        "tok_embeddings": (vocab_size, dim),
        "rms_att": (n_layers, dim),
        "wq": (n_layers, dim, dim),
        "wk": (n_layers, kv_dim, dim),
        "wv": (n_layers, kv_dim, dim),
        "wo": (n_layers, dim, dim),
        "rms_ffn": (n_layers, dim),
        "w1": (n_layers, hidden_dim, dim),
        "w2": (n_layers, dim, hidden_dim),
        "w3": (n_layers, hidden_dim, dim),
        "rms_final": (dim,),
        "freq_cis": (seq_len, head_dim),  # real and imaginary halves, unused
    }
    if not shared:
        sizes["output"] = (vocab_size, dim)
    n_floats = sum(torch.Size(s).numel() for s in sizes.values())
    expected = LLAMA2C_HEADER.size + 4 * n_floats
    if len(raw) != expected:
        raise LLMKitError(
            f"{path}: {len(raw)} bytes, but its header describes {expected}: the file is truncated or "
            "corrupt; download it again"
        )
    flat = torch.frombuffer(bytearray(raw[LLAMA2C_HEADER.size :]), dtype=torch.float32)
    t, offset = {}, 0
    for name, shape in sizes.items():
        n = torch.Size(shape).numel()
        t[name] = flat[offset : offset + n].view(shape)
        offset += n
    args = ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
        hidden_dim=hidden_dim, max_seq_len=min(seq_len, max_seq_len or seq_len), tie_embeddings=shared,
    )  # fmt: skip
    state = {"tok_embeddings.weight": t["tok_embeddings"], "norm.weight": t["rms_final"]}
    state["output.weight"] = t["output"] if not shared else t["tok_embeddings"]
    for i in range(n_layers):
        p = f"layers.{i}."
        state[p + "attention_norm.weight"] = t["rms_att"][i]
        state[p + "attention.wq.weight"] = interleaved_to_halves(t["wq"][i], n_heads)
        state[p + "attention.wk.weight"] = interleaved_to_halves(t["wk"][i], n_kv_heads)
        state[p + "attention.wv.weight"] = t["wv"][i]
        state[p + "attention.wo.weight"] = t["wo"][i]
        state[p + "ffn_norm.weight"] = t["rms_ffn"][i]
        state[p + "feed_forward.w1.weight"] = t["w1"][i]
        state[p + "feed_forward.w2.weight"] = t["w2"][i]
        state[p + "feed_forward.w3.weight"] = t["w3"][i]
    return build_model(args, {k: v.clone() for k, v in state.items()}, path)


# ---- Hugging Face ---------------------------------------------------------------------------


def args_from_hf_config(config: dict, max_seq_len: int | None = None) -> ModelArgs:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        raise LLMKitError(f"architecture {arch} is not supported; llmkit loads LlamaForCausalLM and Qwen2ForCausalLM")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        raise LLMKitError(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads: not supported")
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default", None):
        raise LLMKitError(f"rope scaling {scaling} is not supported (llmkit knows Llama 3.1's 'llama3')")
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        scaling = None
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    ctx = config.get("max_position_embeddings", 2048)
    return ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta),
        rope_scaling={k: scaling[k] for k in LLAMA3_SCALING_KEYS} if scaling else None,
        max_seq_len=min(ctx, max_seq_len or ctx),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM",
    )


LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def hf_to_ours(name: str) -> str:
    for ours, theirs in HF_GLOBAL_NAMES.items():
        if name.startswith(theirs + "."):
            return ours + name[len(theirs) :]
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        for ours, theirs in HF_LAYER_NAMES.items():
            if rest.startswith(theirs + "."):
                return f"layers.{i}.{ours}{rest[len(theirs):]}"
    raise KeyError(name)


def ours_to_hf(name: str) -> str:
    for ours, theirs in HF_GLOBAL_NAMES.items():
        if name.startswith(ours + "."):
            return theirs + name[len(ours) :]
    _, i, rest = name.split(".", 2)
    for ours, theirs in HF_LAYER_NAMES.items():
        if rest.startswith(ours + "."):
            return f"model.layers.{i}.{theirs}{rest[len(ours):]}"
    raise KeyError(name)


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise LLMKitError(f"{path}: cannot read the weights ({e}); the file is truncated or corrupt") from None


def load_hf(folder: Path, max_seq_len: int | None = None) -> Transformer:
    """A Hugging Face folder: config.json + model.safetensors, or shards listed in an index."""
    config = read_json_object(folder / "config.json", "Hugging Face checkpoint")
    try:
        args = args_from_hf_config(config, max_seq_len)
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:  # a field missing, wrong or 0
        raise LLMKitError(f"{folder / 'config.json'} does not describe a model ({type(e).__name__}: {e})") from None
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index, "sharded checkpoint").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise LLMKitError(f"{index} has no weight_map of tensor names to files; download the checkpoint again")
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise LLMKitError(f"{folder}: no model.safetensors or model.safetensors.index.json beside config.json")
    state = {}
    for f in files:
        if not (folder / f).exists():
            raise LLMKitError(f"{folder}: shard {f} listed in the index is missing; download the model again")
        for name, tensor in _read_safetensors(folder / f).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            try:
                state[hf_to_ours(name)] = tensor
            except KeyError:
                raise LLMKitError(f"{folder / f}: unexpected tensor {name}") from None
    if args.tie_embeddings:
        state.pop("output.weight", None)
        state["output.weight"] = state.get("tok_embeddings.weight")
    return build_model(args, state, folder)


def hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: int | None, eos_ids: list[int]) -> dict:
    """The config.json that transformers reads back as the same model."""
    config = {
        "architectures": ["Qwen2ForCausalLM" if args.qkv_bias else "LlamaForCausalLM"],
        "model_type": "qwen2" if args.qkv_bias else "llama",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
    }
    if args.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", **args.rope_scaling}
    return config


def save_hf(model: Transformer, out_dir: str | Path, tokenizer_path: str | Path | None = None,
            bos_id: int | None = None, eos_ids: list[int] = (), force: bool = False) -> Path:  # fmt: skip
    """Write config.json + model.safetensors (+ the tokenizer file) atomically into out_dir."""
    out_dir = check_output_path(out_dir, force, folder=True)
    return write_folder_atomically(out_dir, lambda tmp: write_hf(model, tmp, tokenizer_path, bos_id, eos_ids))


def write_hf(model: Transformer, folder: Path, tokenizer_path: str | Path | None = None,
             bos_id: int | None = None, eos_ids: list[int] = ()) -> None:  # fmt: skip
    """The files of `save_hf`, written straight into an existing folder."""
    state = {}
    for name, tensor in checkpoint_state(model).items():
        if model.args.tie_embeddings and name == "output.weight":
            continue
        state[ours_to_hf(name)] = tensor.detach().contiguous()
    config = hf_config(model.args, model.tok_embeddings.weight.dtype, bos_id, list(eos_ids))
    try:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    except SafetensorError as e:  # safetensors reports a full disk as its own error; the atomic writers take OSError
        if "I/O error" not in str(e):
            raise
        raise OSError(first_line(e)) from None
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, folder / Path(tokenizer_path).name)


def checkpoint_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names: its wqkv split back into wq, wk and wv."""
    state, sizes = {}, model.layers[0].attention.qkv_sizes
    for name, tensor in model.state_dict().items():
        if ".wqkv." not in name:
            state[name] = tensor
            continue
        for w, part in zip(("wq", "wk", "wv"), tensor.split(sizes), strict=True):
            state[name.replace("wqkv", w)] = part
    return state


# ---- Meta -----------------------------------------------------------------------------------


def args_from_meta(params: dict, state: dict, max_seq_len: int | None) -> ModelArgs:
    """ModelArgs from Meta's params.json; the vocabulary and MLP widths are read off the weights."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    return ModelArgs(
        dim=dim, n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=state["tok_embeddings.weight"].shape[0],
        hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 10000.0)),
        rope_scaling=scaling, max_seq_len=max_seq_len or 2048, tie_embeddings="output.weight" not in state,
    )  # fmt: skip


def load_meta(folder: Path, max_seq_len: int | None = None) -> Transformer:
    """Meta's params.json + consolidated.NN.pth (model-parallel shards are concatenated)."""
    params = read_json_object(folder / "params.json", "Meta checkpoint")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise LLMKitError(f"{folder}: params.json but no consolidated.*.pth weights")
    parts = [read_torch_file(s, "download it again", mmap=True) for s in shards]
    state = {}
    for name in parts[0]:
        if name.endswith("rope.freqs"):
            continue
        if len(parts) == 1 or parts[0][name].dim() == 1:
            state[name] = parts[0][name]
        else:  # column-parallel layers split their rows, row-parallel ones their columns
            cat_dim = 1 if any(s in name for s in ("wo.", "w2.", "tok_embeddings")) else 0
            state[name] = torch.cat([p[name] for p in parts], dim=cat_dim)
    try:
        args = args_from_meta(params, state, max_seq_len)
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:  # a field missing, wrong or 0
        what = f"{type(e).__name__}: {e}"
        raise LLMKitError(f"{folder / 'params.json'} does not describe these weights ({what})") from None
    n_heads, n_kv_heads = args.n_heads, args.n_kv_heads
    for i in range(args.n_layers):
        for w, heads in (("wq", n_heads), ("wk", n_kv_heads)):
            key = f"layers.{i}.attention.{w}.weight"
            state[key] = interleaved_to_halves(state[key], heads)
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return build_model(args, state, folder)


# What torch.load raises for a damaged, truncated or foreign file (a zip or pickle broken anywhere), measured
# on random, cut and bit-flipped files; anything else is a bug to see, not a bad download.
DAMAGED_TORCH_FILE = (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError)


def read_torch_file(path: Path, fix: str, mmap: bool = False) -> object:
    """torch.load of weights only, or one line naming the file and `fix` (what the user should do)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as e:
        raise LLMKitError(f"cannot read {path} ({e.strerror or e}); check that it is a readable file") from None
    except DAMAGED_TORCH_FILE as e:
        raise LLMKitError(f"{path} is damaged or not a PyTorch file ({first_line(e)}); {fix}") from None


def save_meta(model: Transformer, folder: str | Path, force: bool = False) -> Path:
    """Write a float model as Meta's params.json + consolidated.00.pth, the checkpoint ExecuTorch's export_llm
    reads (its Llama rotates interleaved pairs, so q and k rows go back to Meta's order)."""
    args, folder = model.args, check_output_path(folder, force, folder=True)
    if args.rope_scaling or args.qkv_bias:
        raise LLMKitError("this model uses RoPE scaling or q/k/v biases, which Meta's checkpoint format can't hold")
    state = {name: t.detach().clone() for name, t in checkpoint_state(model).items()}  # tied output written out
    for i in range(args.n_layers):
        for w, heads in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
            key = f"layers.{i}.attention.{w}.weight"
            state[key] = halves_to_interleaved(state[key], heads)
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "hidden_dim": args.hidden_dim, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta}  # fmt: skip

    def fill(tmp: Path) -> None:
        torch.save(state, tmp / "consolidated.00.pth")
        (tmp / "params.json").write_text(json.dumps(params))

    return write_folder_atomically(folder, fill)
