"""Tiny GGUF files for tests, written with the `gguf` package as llama.cpp lays a Llama model out:
its tensor names, q/k rows permuted the way llama.cpp's converter permutes them (transformers
undoes that on load), a byte-level BPE tokenizer with its merges and a chat template. Written
from a tiny Hugging Face model, so a test can compare what ftdist loads with the model it came
from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ftdist.data.chat_templates import CHATML
from ftdist.data.tokenizer import train_tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog " * 4, "reverse 12345 = 54321", "hello world, hello GGUF"]
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def tiny_hf_llama(out: Path, tied: bool = True, vocab_size: int = 320, seed: int = 0) -> Path:
    """A tiny Llama (hidden 64, 2 blocks, GQA) with a tokenizer trained on a few lines, saved as
    an HF directory; the source of write_gguf."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = train_tokenizer(TEXT, vocab_size)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=tied,
                         max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q and k (rotary halves interleaved per head)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(hf_dir: Path, out: Path, quant: str = "Q8_0") -> Path:
    """hf_dir's model and tokenizer as one GGUF file: 2-D weights in `quant` (a gguf
    GGMLQuantizationType name; F32 keeps them whole), norms in F32."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = model.config
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, hf_dir)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:  # no output.weight: tied, as llama.cpp writes it
            continue
        gguf_name = tensor_name(name)
        data = tensor.numpy()
        if gguf_name.endswith("attn_q.weight"):
            data = permuted(data, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            data = permuted(data, config.num_key_value_heads)
        add_tensor(writer, gguf_name, data, quant if data.ndim == 2 else "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def tensor_name(hf_name: str):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.<i>.<module>.<proj>.weight
    block, module = parts[2], ".".join(parts[3:-1])
    return f"blk.{block}.{HF_TO_GGUF[module]}.weight"


def add_tensor(writer, name: str, data: np.ndarray, quant: str) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[quant]
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype in gguf.quants._type_traits or qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:  # a type gguf cannot write: its bytes, the right size, so that only reading it fails
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.zeros((*data.shape[:-1], data.shape[-1] // block * size), dtype=np.uint8)
        writer.add_tensor(name, raw, raw_dtype=qtype)


def add_tokenizer(writer, hf_dir: Path) -> None:
    """The byte-level BPE of tokenizer.json in GGUF's terms (tokens, merges, token types)."""
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [None] * (max([*vocab.values(), *added.values()]) + 1)
    for token, index in {**vocab, **added}.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in added else 1 for token in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index(config["eos_token"]))
    writer.add_pad_token_id(tokens.index(config["pad_token"]))
    writer.add_chat_template(CHATML)
