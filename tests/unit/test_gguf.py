"""GGUF models in (issue 37): a .gguf file (or a directory and model.gguf_file) is dequantized
once into the run's plain HF base/, tokenizer and chat template included, and everything after
reads that base; a file that is not GGUF, or a quantization transformers cannot dequantize, is
one message with exit 2. Tiny files written by tests/gguf_files.py, as llama.cpp lays them out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ftdist.config.load import validate_config
from ftdist.errors import UserError
from ftdist.launch.local import train_local
from ftdist.launch.preflight import model_config_of
from ftdist.training.notice import StopNotice, StoppedOnNotice
from tests.conftest import DEMO, run_cli, tiny_config, write_config
from tests.gguf_files import tiny_hf_llama, write_gguf


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    """A tied tiny Llama as an HF directory (hf/) and as GGUF files in F32 and Q8_0."""
    root = tmp_path_factory.mktemp("gguf")
    hf = tiny_hf_llama(root / "hf", tied=True)
    for quant in ("F32", "Q8_0", "Q8_1"):
        write_gguf(hf, root / f"tiny-{quant}.gguf", quant)
    return root


def gguf_config(tmp_path: Path, name_or_path: str, *overrides: str):
    return tiny_config(tmp_path, "model.init=null", f"model.name_or_path={name_or_path}", "train.max_steps=2",
                       "train.eval_every=2", "checkpoint.every_steps=2", "train.warmup_steps=0", *overrides)


def logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model(torch.tensor([[3, 17, 200, 45, 9, 101]])).logits


def test_a_gguf_file_is_written_once_as_the_runs_plain_base(tmp_path, gguf_dir):
    cfg = gguf_config(tmp_path, str(gguf_dir / "tiny-F32.gguf"))
    base = Path(cfg.run.output) / "t" / "base"
    from ftdist.io.storage import RunStore
    from ftdist.training.base import resolve_base

    assert resolve_base(cfg, RunStore(str(base.parent), base.parent, cfg.storage)) == str(base)
    config = json.loads((base / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    with safe_open(str(base / "model.safetensors"), "pt") as weights:  # the tied tensor saved once
        assert "model.embed_tokens.weight" in weights.keys() and "lm_head.weight" not in weights.keys()
    # F32 in GGUF: the same model as the one the file was written from, exactly
    assert torch.equal(logits(base), logits(gguf_dir / "hf"))
    from transformers import AutoTokenizer

    tokenizer, source = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(gguf_dir / "hf")
    text = "reverse 12345 = 54321 <|im_end|> hello"
    assert tokenizer(text).input_ids == source(text).input_ids
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|endoftext|>"


def test_a_quantized_gguf_in_a_directory_trains_resumes_and_exports(tmp_path, gguf_dir):
    cfg = gguf_config(tmp_path, str(gguf_dir), "model.gguf_file=tiny-Q8_0.gguf", "method=lora")
    run = Path(cfg.run.output) / "t"
    notice = StopNotice()
    notice.request("a test's notice")  # stops after the first step, with a checkpoint
    with pytest.raises(StoppedOnNotice):
        train_local(cfg, show_progress=False, notice=notice)
    # dequantized: close to the source model, not equal (Q8_0 rounds each block of 32)
    difference = (logits(run / "base") - logits(gguf_dir / "hf")).abs().max().item()
    assert 0 < difference < 0.05
    written = (run / "base" / "model.safetensors").stat().st_mtime_ns
    assert train_local(cfg, show_progress=False)["steps"] == 2 and (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "base" / "model.safetensors").stat().st_mtime_ns == written  # resumed from the base it wrote
    result = run_cli("export", str(run), "--out", str(tmp_path / "exported"), "--merge")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["tie_word_embeddings"] is True


def test_plan_reads_a_gguf_files_architecture_from_its_metadata(tmp_path, gguf_dir):
    cfg = gguf_config(tmp_path, str(gguf_dir / "tiny-Q8_0.gguf"))
    config = model_config_of(cfg)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.tie_word_embeddings) == \
        ("llama", 2, 64, True)
    assert not (Path(cfg.run.output) / "t").exists()  # reading the plan writes nothing


def test_a_file_that_is_not_gguf_and_a_quantization_transformers_cannot_read_are_one_message(tmp_path, gguf_dir):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, renamed")
    result = run_cli("train", str(write_config(tmp_path, gguf_config(tmp_path, str(fake)))), "--local")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"model.name_or_path {fake}: not a GGUF file (it starts with b'PK\\x03\\x04'" in result.stderr
    cfg = gguf_config(tmp_path, str(gguf_dir), "model.gguf_file=tiny-Q8_1.gguf")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--local")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "transformers cannot load this GGUF file: Dequantization for Q8_1 is not yet implemented" in result.stderr
    assert not (Path(cfg.run.output) / "t" / "base").exists() and not (Path(cfg.run.output) / "t" / "base.tmp").exists()


def test_where_a_gguf_file_is_named_and_how_a_wrong_name_is_told(tmp_path, gguf_dir):
    from ftdist.model.source import check_model_source, gguf_location

    def location(**model):
        return gguf_location(validate_config({"run": {"name": "x"}, "model": model,
                                              "data": {"train": str(DEMO / "train.jsonl")}}).model)

    blob = tmp_path / "sha256-0123abcd"  # an Ollama blob: a GGUF file without the suffix
    blob.write_bytes((gguf_dir / "tiny-Q8_0.gguf").read_bytes())
    assert location(name_or_path=str(blob)) == (str(tmp_path), blob.name)
    assert location(name_or_path="s3://bucket/models/smol.gguf") == ("s3://bucket/models", "smol.gguf")
    assert location(name_or_path=str(gguf_dir), gguf_file="tiny-F32.gguf") == (str(gguf_dir), "tiny-F32.gguf")
    assert location(name_or_path=str(gguf_dir / "hf")) is None
    with pytest.raises(UserError, match="already names a GGUF file"):
        location(name_or_path=str(blob) + ".gguf", gguf_file="x.gguf")
    with pytest.raises(UserError, match="the name of a .gguf file in the directory"):
        location(name_or_path=str(gguf_dir), gguf_file="sub/x.gguf")
    with pytest.raises(UserError, match=r"no config.json there, but GGUF files \(tiny-F32.gguf, tiny-Q8_0.gguf"):
        check_model_source(str(gguf_dir), None)
