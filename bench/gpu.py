"""ftdist at real size on one GPU, against the plain loops users would otherwise write.

A, full fine-tuning of a Llama-3.2-1B shape, bf16, micro batch 8 x 2048 tokens: ftdist local
mode and ftdist in a 1-worker Ray Train + DeepSpeed (ZeRO-2) group, against a plain PyTorch
loop (bf16 autocast, fp32 master weights, fused AdamW, SDPA) and the same loop with
torch.compile. B, QLoRA of a Llama-3.1-8B shape (NF4, double quantization, rank 16 on every
linear layer, micro batch 4 x 2048): ftdist against transformers + PEFT + bitsandbytes with
gradient checkpointing. Shapes from jobs/model-configs/, random weights (no hub here), the
demo rows as plain text (every token a target, as for the baselines), packed.

Per row: tokens/s (median step after the warm-up steps, which compile), MFU, peak memory
(GPU: torch.cuda.max_memory_allocated; CPU: ftdist.sizing.memory.PeakMemory), the switches on, and
the ratio to each baseline. MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak;
FLOPs per token (forward + backward) = 6 N for the linear weights (the LM head included, the
input embedding not), 4 N of them where they are frozen (no weight gradient) and 6 N for the
adapters, plus 6 L d s for causal attention (L blocks, width d, sequence s).
Goals: A, ftdist at least 1.15x the torch.compile loop; B, ftdist at least 2x the HF loop's
tokens/s at no more than 0.7x its peak memory.

Run on the GPU machine: python bench/gpu.py  (about 8 minutes on an H100 / H200; writes
bench/results/gpu.{json,md}). `--tiny` runs the same code on CPU at toy shapes in seconds
(compile left off there), for the suite; `--address` joins a running Ray.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftdist.model.attention import document_mask  # noqa: E402
from ftdist.config.load import load_config  # noqa: E402
from ftdist.config.schema import Config
from ftdist.data.rows import IGNORE, build_dataset, collate, epoch_order  # noqa: E402
from ftdist.sizing.memory import GiB, PeakMemory  # noqa: E402
from ftdist.io.metrics_log import read_metrics  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOALS = {"full_vs_compiled_torch": 1.15, "qlora_vs_hf_tokens": 2.0, "qlora_vs_hf_memory": 0.7}
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # FLOP/s, SXM parts


@dataclass(frozen=True)
class Case:
    name: str
    shape: str  # a directory of jobs/model-configs, or a tiny model.init
    method: str
    micro_batch: int
    seq: int
    steps: int
    warmup: int
    switches: tuple[str, ...] = ()  # ftdist's --set overrides beyond the defaults
    tiny_init: dict = field(default_factory=dict)


def cases(tiny: bool) -> list[Case]:
    if tiny:
        init = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
                "vocab_size": 512}
        return [Case("A", "tiny", "full", 2, 128, 3, 1, ("train.compile=false",), init),
                Case("B", "tiny", "qlora", 2, 128, 3, 1, ("train.gradient_checkpointing=true",), init)]
    return [Case("A", "llama-3.2-1b", "full", 8, 2048, 12, 4, ("train.compile=true",)),
            Case("B", "llama-3.1-8b", "qlora", 4, 2048, 8, 3, ("train.gradient_checkpointing=true",))]


def model_config(case: Case, tokenizer):
    from transformers import AutoConfig

    from ftdist.config.schema import ModelInit
    from ftdist.model.source import init_model_config

    if case.tiny_init:
        config = init_model_config(ModelInit(**case.tiny_init))
    else:
        config = AutoConfig.from_pretrained(ROOT / "jobs" / "model-configs" / case.shape)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = (
        tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    return config


def make_base(case: Case, corpus: Path, device: torch.device, out: Path) -> Path:
    """Random weights of the case's shape (initialised on the device, saved in bf16 on a GPU)
    with a small BPE tokenizer trained on the corpus: what every row loads."""
    from transformers import AutoModelForCausalLM

    from ftdist.data.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tokenizer = train_tokenizer(texts, 512 if case.tiny_init else 4096)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(case, tokenizer), dtype=dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def text_corpus(out: Path) -> Path:
    """The demo rows as plain text: every token is a target, for ftdist and the baselines alike."""
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "train.jsonl").read_text().splitlines()]
    out.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in rows))
    return out


def ftdist_config(case: Case, base: Path, corpus: Path, output: Path, name: str, *extra: str) -> Config:
    never = case.steps + 1
    lora = ["lora.rank=16", "lora.alpha=32", "lora.target_modules=all-linear"] if case.method != "full" else []
    return load_config(ROOT / "jobs" / "configs" / "tiny-demo.yaml", [
        f"run.output={output}", f"run.name={name}", "model.init=null", f"model.name_or_path={base}",
        f"method={case.method}", "freeze_layers=0", *lora, f"data.train={corpus}", "data.format=text",
        "data.eval=null", "data.eval_fraction=0", "data.retention=null", f"data.max_length={case.seq}",
        "data.packing=true", "distributed.workers=0", f"train.max_steps={never - 1}", f"train.batch_size={case.micro_batch}",
        f"train.micro_batch_size={case.micro_batch}", "train.schedule=constant", "train.warmup_steps=0",
        "train.lr=1e-5" if case.method == "full" else "train.lr=2e-4",
        f"train.eval_every={never}", f"checkpoint.every_steps={never}", f"train.log_every={never}",
        *case.switches, *extra])


def ftdist_row(cfg: Config, address: Optional[str] = None) -> dict:
    """A run of ftdist's loop: local mode, or Ray (distributed.workers) on the cluster at
    `address` (None: RAY_ADDRESS, or a local one started here)."""
    if not cfg.distributed.workers:
        from ftdist.launch.local import train_local

        summary = train_local(cfg, show_progress=False)
    else:
        from ftdist.launch.ray_train import train_ray

        summary = train_ray(cfg, address=address, show_progress=False)
    records = [r for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if "step_time_s" in r]
    return {"step_s": [r["step_time_s"] for r in records], "peak_gib": max(r["peak_memory_gib"] for r in records)}


def rows_of(cfg: Config, base: Path):
    from ftdist.model.source import load_tokenizer

    tokenizer = load_tokenizer(cfg, str(base))
    return build_dataset(cfg.data, tokenizer, cfg.train.seed).train, tokenizer.pad_token_id


def batches(rows, pad_id: int, case: Case, device: torch.device):
    """Micro batches in epoch order, forever (the steps outnumber the rows of one epoch)."""
    for epoch in range(10**6):
        order = epoch_order(len(rows), 0, epoch).tolist()
        for i in range(0, len(order) - case.micro_batch + 1, case.micro_batch):
            b = collate(rows, order[i:i + case.micro_batch], pad_id)
            yield {"input_ids": b["input_ids"].to(device), "position_ids": b["position_ids"].to(device),
                   "attention_mask": document_mask(b["doc"], "sdpa", device), "targets": b["targets"].to(device)}


def timed_steps(step: Callable[[dict], None], data, case: Case, device: torch.device) -> list[float]:
    times = []
    for _ in range(case.steps):
        batch = next(data)
        started = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def torch_row(case: Case, cfg: Config, base: Path, device: torch.device, compiled: bool) -> dict:
    """The plain loop: bf16 autocast over fp32 weights, full logits, fused AdamW."""
    from transformers import AutoModelForCausalLM

    rows, pad_id = rows_of(cfg, base)
    peak = PeakMemory(device)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    model.train()
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step(b: dict) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = forward(input_ids=b["input_ids"], position_ids=b["position_ids"],
                             attention_mask=b["attention_mask"]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten(), ignore_index=IGNORE)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed_steps(step, batches(rows, pad_id, case, device), case, device)
    return {"step_s": times, "peak_gib": peak.bytes() / GiB}


def hf_qlora_row(case: Case, cfg: Config, base: Path, device: torch.device) -> dict:
    """transformers + PEFT + bitsandbytes as their docs put it together: a 4-bit base prepared
    for k-bit training with gradient checkpointing, LoRA on every linear layer, the model's own
    loss."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    rows, pad_id = rows_of(cfg, base)
    peak = PeakMemory(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization, dtype=dtype,
                                                 device_map={"": device})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(b: dict) -> None:
        # The model's loss shifts labels by one: ftdist's targets are already aligned to the logits.
        labels = torch.cat([torch.full_like(b["targets"][:, :1], IGNORE), b["targets"][:, :-1]], dim=1)
        model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
              labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed_steps(step, batches(rows, pad_id, case, device), case, device)
    return {"step_s": times, "peak_gib": peak.bytes() / GiB}


def flops_per_token(cfg: Config, case: Case) -> float:
    from torch import nn

    from ftdist.sizing.memory import run_shell
    from ftdist.launch.preflight import model_config_of

    model_config = model_config_of(cfg)
    shell = run_shell(cfg, model_config)
    embedding = shell.get_input_embeddings().weight
    linear = [m.weight for m in shell.modules() if isinstance(m, nn.Linear) and m.weight is not embedding]
    per_weight = sum((6 if w.requires_grad else 4) * w.numel() for w in linear)
    attention = 6 * model_config.num_hidden_layers * model_config.hidden_size * case.seq
    return float(per_weight + attention)


def summarize(case: Case, name: str, found: dict, flops: float, peak_flops: Optional[float], switches: str) -> dict:
    steady = found["step_s"][case.warmup:] or found["step_s"]
    tokens_per_s = case.micro_batch * case.seq / statistics.median(steady)
    return {"case": case.name, "row": name, "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(tokens_per_s * flops / peak_flops, 4) if peak_flops else None,
            "peak_gib": round(found["peak_gib"], 3), "switches": switches,
            "step_s": [round(t, 4) for t in found["step_s"]]}


def ftdist_switches(cfg: Config, device: torch.device) -> str:
    from ftdist.model.attention import implementation
    from ftdist.model.build import compute_dtype
    from ftdist.launch.preflight import model_config_of

    t = cfg.train
    on = [str(compute_dtype(cfg, device)).removeprefix("torch."), "compile" if t.compile else "",
          "gradient checkpointing" if t.checkpoint_every else "", "chunked loss" if t.chunked_loss else "",
          "attention " + implementation(cfg.model.attention, model_config_of(cfg), device)]
    return ", ".join(filter(None, on))


def gpu_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)


def run_case(case: Case, tmp: Path, device: torch.device, address: Optional[str], say) -> list[dict]:
    tmp.mkdir(parents=True)
    corpus = text_corpus(tmp / "corpus.jsonl")
    base = make_base(case, corpus, device, tmp / f"base-{case.name}")
    cfg = ftdist_config(case, base, corpus, tmp / "runs", f"{case.name}-local")
    flops, peak = flops_per_token(cfg, case), gpu_peak_flops(device)
    on = ftdist_switches(cfg, device)
    rows = [summarize(case, "ftdist local", ftdist_row(cfg), flops, peak, on)]
    say(rows[-1])
    if case.method == "full":
        resources = "{GPU: 1}" if device.type == "cuda" else "{CPU: 1}"
        ray_cfg = ftdist_config(case, base, corpus, tmp / "runs", f"{case.name}-ray", "distributed.workers=1",
                                "distributed.zero_stage=2", f"distributed.resources_per_worker={resources}",
                                "distributed.max_failures=0")
        rows.append(summarize(case, "ftdist, 1 Ray Train worker, DeepSpeed ZeRO-2",
                              ftdist_row(ray_cfg, address), flops, peak, on))
        say(rows[-1])
        for with_compile in (False, True):
            # Compiling takes minutes on a CPU: --tiny runs that row uncompiled, and says so.
            compiled = with_compile and device.type == "cuda"
            name = "plain PyTorch" + (" + torch.compile" if with_compile else "")
            switches = ("bf16 autocast" if device.type == "cuda" else "float32") + ", fused AdamW, sdpa, full logits"
            rows.append(summarize(case, name, torch_row(case, cfg, base, device, compiled), flops, peak,
                                  switches + (", torch.compile" if compiled else ", uncompiled here")))
            say(rows[-1])
    else:
        rows.append(summarize(case, "transformers + PEFT + bitsandbytes", hf_qlora_row(case, cfg, base, device),
                              flops, peak, "gradient checkpointing, nf4 double quant, rank 16 all-linear, "
                              "the model's own loss (full logits)"))
        say(rows[-1])
    return rows


def verdicts(rows: list[dict]) -> dict:
    def row(case: str, name: str) -> dict:
        return next(r for r in rows if r["case"] == case and r["row"] == name)

    a, a_base = row("A", "ftdist local"), row("A", "plain PyTorch + torch.compile")
    b, b_base = row("B", "ftdist local"), row("B", "transformers + PEFT + bitsandbytes")
    def ratio(x: float, y: float) -> Optional[float]:
        return round(x / y, 3) if y > 0 else None  # a CPU peak below the process's earlier one reads 0

    ratios = {"full_vs_compiled_torch": ratio(a["tokens_per_s"], a_base["tokens_per_s"]),
              "qlora_vs_hf_tokens": ratio(b["tokens_per_s"], b_base["tokens_per_s"]),
              "qlora_vs_hf_memory": ratio(b["peak_gib"], b_base["peak_gib"])}
    met = {k: None if v is None else (v <= GOALS[k] if k.endswith("memory") else v >= GOALS[k])
           for k, v in ratios.items()}
    return {"ratios": ratios, "met": met}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# ftdist against plain loops ({result['date']}, {result['device']})", "",
             "| case | row | tokens/s | MFU | peak GiB | switches |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['row']} | {r['tokens_per_s']:.0f} | "
              f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')} | {r['peak_gib']:.2f} | {r['switches']} |"
              for r in result["rows"]]
    lines += ["", "Ratios " + json.dumps(result["ratios"]) + "; goals " + json.dumps(GOALS) + "; met "
              + json.dumps(result["met"]), "", result["method"]]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes on CPU (the suite's run)")
    parser.add_argument("--address", help="a running Ray cluster to join (default: a local one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.disable_progress_bar()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftdist-gpu-bench-") as tmp:
        for case in cases(args.tiny):
            rows += run_case(case, Path(tmp) / case.name, device, args.address,
                             lambda r: print(json.dumps({k: v for k, v in r.items() if k != "step_s"}), flush=True))
    result = {"date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--tiny)",
              "torch": torch.__version__, "rows": rows, **verdicts(rows), "goals": GOALS,
              "method": "tokens/s: micro batch x sequence over the median step after the warm-up steps; "
                        "MFU: tokens/s x (6 N trained + 4 N frozen linear weights + 6 L d s) / dense bf16 peak "
                        "(989 TFLOP/s for H100 and H200 SXM); peak: torch.cuda.max_memory_allocated (GPU), "
                        "peak RSS less RSS before the model (CPU; the kernel's high-water mark of the whole process, so a "
                        "row whose peak stays below an earlier row's reads 0: CPU peaks here are no comparison)."}
    write(result, args.out)
    print((args.out / "gpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
