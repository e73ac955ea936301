"""The bad-input battery: the mistakes and faults a new user meets, each through the real
`ftdist` command in a process of its own, each expected to end in one clear message or, where
the run can go on safely, in a finished run with one warning line.

A case passes when:
- error: exit code 2, exactly one `ftdist: error:` line, every expected fragment (the file,
  key or line it names, and the fix) in stderr, no traceback, within its time limit;
- runs: exit code 0, the expected fragments (the warning) in the output, no traceback;
- refuses: a report that answers no (`ftdist plan` of a config that cannot fit): exit code 2,
  the reason in the output, no traceback.

Families: config (YAML, keys, types, values, --set), data (files, rows, formats, mixtures,
lists), model (paths, weights, hub, fit), storage (a real S3 server: moto_server on loopback),
links (symbolic links planted where ftdist writes), writers (two writers of one run),
ray (addresses, placement), resume (damaged snapshots and checkpoints), tune, cli, tracebacks
(faults that once ended in a traceback: sandboxed chat templates, permissions, a full disk, flags);
results (numbers that are not results: divergence, evaluations over nothing, half-read files),
bounds (bounded work on any input: alias bombs, huge configs, values and rows) and lies (small
lies: merge keys, $VAR, secrets in URLs, FIFOs, a run directory for its model, a stop before the
summary). A case may also name fragments that must be absent (a secret) and check what the
command left (`after`: no final/ of a diverged run).

Run: .venv/bin/python bench/bad_inputs.py [-k SUBSTRING] [-j JOBS]
Prints each case and `N passed, N failed`; writes bench/results/bad_inputs.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "data" / "demo"
RESULTS = ROOT / "bench" / "results"
FTDIST = [sys.executable, "-m", "ftdist"]
PROMPTS = (DEMO / "train.jsonl").read_text().splitlines()


class Workspace:
    """One case's directory, its files and its config."""

    def __init__(self, root: Path, env: dict):
        self.dir, self.env = root, env
        self.background: list[subprocess.Popen] = []  # killed once the case's command has ended

    def start(self, *argv: str, ready: Callable[[], bool], timeout: float = 150) -> subprocess.Popen:
        """A command running beside the one the case checks (e.g. a first writer), once `ready`."""
        proc = subprocess.Popen(list(argv), env=self.env, cwd=self.dir, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        self.background.append(proc)
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"background command not ready: {argv}\n{proc.stderr.read()[-1500:] if proc.poll() is not None else 'timed out'}")
            time.sleep(0.1)
        return proc

    def file(self, name: str, content) -> str:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return str(path)

    def rows(self, name: str, rows: list, n_good: int = 20) -> str:
        """A JSONL file: n_good demo rows, then `rows` (dicts, or raw lines as str)."""
        lines = PROMPTS[:n_good] + [r if isinstance(r, str) else json.dumps(r) for r in rows]
        return self.file(name, "\n".join(lines) + "\n")

    def raw(self, *overrides: str) -> dict:
        from ftdist.config.load import apply_override

        raw = {
            "run": {"name": "case", "output": str(self.dir / "runs")},
            "model": {"init": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                               "vocab_size": 384}},
            "method": "full",
            "data": {"train": str(DEMO / "train.jsonl"), "eval": str(DEMO / "eval.jsonl"), "max_length": 64},
            "train": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 4, "warmup_steps": 1,
                      "eval_every": 2, "log_every": 1},
            "checkpoint": {"every_steps": 1, "keep": 3},
            "distributed": {"workers": 0},
            "storage": {"cache_dir": str(self.dir / "cache")},
        }
        for item in overrides:
            apply_override(raw, item)
        return raw

    def config(self, *overrides: str, raw: dict | None = None, name: str = "config.yaml") -> str:
        return self.file(name, yaml.safe_dump(raw if raw is not None else self.raw(*overrides), sort_keys=False))

    def run(self, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
        """A command the case needs before the one it checks (e.g. a run to damage)."""
        done = subprocess.run(FTDIST + list(argv), capture_output=True, text=True, env=self.env, cwd=self.dir,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"set-up command failed: {argv}\n{done.stderr[-2000:]}")
        return done


@dataclass
class Case:
    family: str
    name: str
    make: Callable[[Workspace], list]  # writes the case's files; returns the ftdist arguments
    expect: tuple = ()  # fragments the message (or the warning) must have
    outcome: str = "error"  # error | runs | refuses
    env: dict = field(default_factory=dict)
    timeout: int = 120
    unprivileged: bool = False  # the command obeys file permissions (as root: without CAP_DAC_OVERRIDE)
    fsize: Optional[int] = None  # a file-size limit (bytes) on the command: a full disk
    absent: tuple = ()  # fragments the output must NOT have (a secret that must never show)
    # A check of what the command left (no final/ of a diverged run): None when right, else the problem.
    after: Optional[Callable[[Workspace, subprocess.CompletedProcess], Optional[str]]] = None
    suite: bool = False  # also run by the test suite's e2e tier (tests/e2e/test_bad_inputs.py): fast, no store


@dataclass
class Result:
    case: Case
    passed: bool
    seconds: float
    why: str
    message: str


CASES: list[Case] = []


def case(family: str, name: str, expect=(), outcome: str = "error", env=None, timeout: int = 120,
         unprivileged: bool = False, fsize: Optional[int] = None, absent=(), after=None, suite: bool = False):
    def register(make):
        CASES.append(Case(family, name, make, tuple([expect] if isinstance(expect, str) else expect), outcome,
                          env or {}, timeout, unprivileged=unprivileged, fsize=fsize,
                          absent=tuple([absent] if isinstance(absent, str) else absent), after=after, suite=suite))
        return make
    return register


def train(w: Workspace, *overrides: str, config: str | None = None) -> list:
    return ["train", config or w.config(*overrides), "--local"]


# ---------------------------------------------------------------- config


@case("config", "unknown top-level key", ("trian: unknown key", "did you mean train"))
def _(w): return ["train", w.config(raw={**w.raw(), "trian": {"lr": 1}})]


@case("config", "unknown nested key", ("train.lrr", "did you mean train.lr"))
def _(w):
    raw = w.raw()
    raw["train"]["lrr"] = 0.1
    return ["train", w.config(raw=raw), "--local"]


@case("config", "wrong type", ("train.lr",))
def _(w): return train(w, "train.lr=fast")


@case("config", "negative batch size", ("train.batch_size",))
def _(w): return train(w, "train.batch_size=-8")


@case("config", "micro batch not dividing", ("micro_batch_size 3 does not divide batch_size 8",))
def _(w): return train(w, "train.micro_batch_size=3")


@case("config", "missing section", ("run",))
def _(w):
    raw = w.raw()
    del raw["run"]
    return ["train", w.config(raw=raw), "--local"]


@case("config", "missing data.train", ("data.train",))
def _(w):
    raw = w.raw()
    del raw["data"]["train"]
    return ["train", w.config(raw=raw), "--local"]


@case("config", "unknown method", ("method",))
def _(w): return train(w, "method=lora2")


@case("config", "YAML syntax error", ("config.yaml:2:", "not valid YAML"))
def _(w): return ["train", w.file("config.yaml", "run: {name: x\nmodel: [\n"), "--local"]


@case("config", "duplicate key", ("train", "twice"))
def _(w):
    text = Path(w.config()).read_text() + "train: {lr: 0.1}\n"
    return ["train", w.file("config.yaml", text), "--local"]


@case("config", "config file missing", ("nope.yaml",))
def _(w): return ["train", str(w.dir / "nope.yaml"), "--local"]


@case("config", "config path is a directory", ("directory",))
def _(w):
    (w.dir / "conf").mkdir()
    return ["train", str(w.dir / "conf"), "--local"]


@case("config", "empty config file", ("config.yaml",))
def _(w): return ["train", w.file("config.yaml", ""), "--local"]


@case("config", "config is a YAML list", ("config.yaml",))
def _(w): return ["train", w.file("config.yaml", "- a\n- b\n"), "--local"]


@case("config", "run.name with a slash", ("run.name",))
def _(w): return train(w, "run.name=a/b")


@case("config", "both model sources", ("model.name_or_path", "model.init"))
def _(w): return train(w, f"model.name_or_path={w.dir}")


@case("config", "heads do not divide hidden size", ("num_heads",))
def _(w): return train(w, "model.init.num_heads=5")


@case("config", "freeze more layers than the model has", ("freeze_layers 5", "2 layers"))
def _(w): return train(w, "freeze_layers=5")


@case("config", "freeze all with lora", ("freeze_layers 'all'",))
def _(w): return train(w, "freeze_layers=all", "method=lora")


@case("config", "qlora with ZeRO-3", ("zero_stage 3",))
def _(w): return ["train", w.config("method=qlora", "distributed.zero_stage=3", "distributed.workers=2")]


@case("config", "--set without =", ("--set 'train.lr'", "dotted.key=value"))
def _(w): return ["train", w.config(), "--local", "--set", "train.lr"]


@case("config", "--set unknown key", ("train.learning_rate", "train.lr"))
def _(w): return ["train", w.config(), "--local", "--set", "train.learning_rate=1e-3"]


@case("config", "--set a section", ("--set", "train"))
def _(w): return ["train", w.config(), "--local", "--set", "train=3"]


@case("config", "--set wrong type", ("train.max_steps",))
def _(w): return ["train", w.config(), "--local", "--set", "train.max_steps=many"]


@case("config", "max_length zero", ("data.max_length",))
def _(w): return train(w, "data.max_length=0")


@case("config", "eval_fraction above 1", ("data.eval_fraction",))
def _(w): return train(w, "data.eval_fraction=1.5")


@case("config", "empty train list", ("data.train: an empty list",))
def _(w): return train(w, "data.train=[]")


@case("config", "a mixture with a missing weight", ("data.train.1: no weight",))
def _(w): return train(w, f"data.train=[{{path: {DEMO / 'train.jsonl'}, weight: 1}}, {{path: {DEMO / 'eval.jsonl'}}}]")


@case("config", "a weight on an eval source", ("data.eval.1.weight",))
def _(w): return train(w, f"data.eval=[{{path: {DEMO / 'eval.jsonl'}}}, {{path: {DEMO / 'eval.jsonl'}, weight: 2}}]")


@case("config", "one name for two eval sources", ("data.eval: the name x",))
def _(w):
    return train(w, f"data.eval=[{{path: {DEMO / 'eval.jsonl'}, name: x}}, {{path: {DEMO / 'train.jsonl'}, name: x}}]")


@case("config", "unknown columns key", ("data.columns", "unknown key"))
def _(w): return train(w, "data.columns={answer: output}")


@case("config", "unknown roles key", ("data.roles", "unknown key"))
def _(w): return train(w, "data.roles={bot: [gpt]}")


@case("config", "keep zero checkpoints", ("checkpoint.keep",))
def _(w): return train(w, "checkpoint.keep=0")


@case("config", "negative workers", ("distributed.workers",))
def _(w): return train(w, "distributed.workers=-1")


@case("config", "unknown zero stage", ("distributed.zero_stage",))
def _(w): return train(w, "distributed.zero_stage=4")


@case("config", "unknown schedule", ("train.schedule",))
def _(w): return train(w, "train.schedule=exponential")


@case("config", "unknown tracker key", ("logging.mlflow",))
def _(w): return train(w, "logging.mlflow={uri: http://127.0.0.1:1}")


@case("config", "another tool's key name", ("train.lr",))
def _(w):
    raw = w.raw()
    raw["train"]["learning_rate"] = 1e-4
    return ["train", w.config(raw=raw), "--local"]


@case("config", "float16 on a CPU", ("float16",))
def _(w): return train(w, "model.dtype=float16")


# ---------------------------------------------------------------- data


@case("data", "training file missing", ("data.train", "not found"))
def _(w): return train(w, f"data.train={w.dir / 'gone.jsonl'}")


@case("data", "eval file missing", ("data.eval", "not found"))
def _(w): return train(w, f"data.eval={w.dir / 'gone.jsonl'}")


@case("data", "retention file missing", ("data.retention", "not found"))
def _(w): return train(w, f"data.retention={w.dir / 'gone.txt'}")


@case("data", "a directory without data files", ("data.train", "holds no data files"))
def _(w):
    (w.dir / "shards").mkdir()
    (w.dir / "shards" / "README").write_text("nothing here")
    return train(w, f"data.train={w.dir / 'shards'}")


@case("data", "a glob that matches nothing", ("data.train", "*.parquet"))
def _(w): return train(w, f"data.train={w.dir / '*.parquet'}")


@case("data", "invalid JSON on a line", ("bad.jsonl:21", "JSON"))
def _(w): return train(w, f"data.train={w.rows('bad.jsonl', ['{not json'])}")


@case("data", "a row without its completion", ("bad.jsonl:21", "completion"))
def _(w): return train(w, f"data.train={w.rows('bad.jsonl', [{'prompt': 'x'}])}")


@case("data", "a completion that is a number", ("bad.jsonl:21", "completion", "string"))
def _(w): return train(w, f"data.train={w.rows('bad.jsonl', [{'prompt': 'x', 'completion': 3}])}")


@case("data", "a row that is a list", ("bad.jsonl:21",))
def _(w): return train(w, f"data.train={w.rows('bad.jsonl', ['[1, 2]'])}")


def bad_utf8(w: Workspace, name: str = "bad.jsonl", good: int = 20) -> str:
    """A JSONL file whose last row has a byte that is not UTF-8."""
    return w.file(name, "\n".join(PROMPTS[:good]).encode() + b'\n{"prompt": "\xff", "completion": "1"}\n')


@case("data", "invalid UTF-8 in training data", ("bad.jsonl", "UTF-8"))
def _(w): return train(w, f"data.train={bad_utf8(w)}")


@case("data", "invalid UTF-8 in eval data", ("bad.jsonl", "UTF-8"))
def _(w): return train(w, f"data.eval={bad_utf8(w)}")


@case("data", "invalid UTF-8 in retention text", ("data.retention", "UTF-8"))
def _(w): return train(w, f"data.retention={w.file('general.txt', b'fine text' + bytes([10, 10, 255]) + b' broken')}")


@case("data", "invalid UTF-8 skipped with skip_bad_rows", ("skipped 1 bad rows",), outcome="runs")
def _(w): return train(w, f"data.train={bad_utf8(w, good=40)}", "data.skip_bad_rows=true")


@case("data", "an empty training file", ("data.train", "empty.jsonl"))
def _(w): return train(w, f"data.train={w.file('empty.jsonl', '')}")


@case("data", "an unknown chat role", ("bad.jsonl:1", "narrator", "data.roles"))
def _(w):
    row = {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
    return train(w, f"data.train={w.rows('bad.jsonl', [row], 0)}", "data.format=chat", "data.chat_template=chatml",
                 "data.eval=null")


@case("data", "preference rows for SFT", ("pref.jsonl", "preference pairs", "objective sft", "set objective: dpo"))
def _(w):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 20
    return train(w, f"data.train={w.rows('pref.jsonl', rows, 0)}", "data.eval=null")


@case("data", "prompt/completion rows for DPO", ("rows.jsonl", "rows are prompt_completion", "objective dpo",
                                                  "preference pairs"))
def _(w):
    rows = [{"prompt": "q", "completion": "a"}] * 20
    return train(w, f"data.train={w.rows('rows.jsonl', rows, 0)}", "data.eval=null", "objective=dpo")


@case("data", "a pair whose chosen equals its rejected", ("pairs.jsonl:2", "the same response", "data.skip_bad_rows"))
def _(w):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "a"}] * 10
    return train(w, f"data.train={w.rows('pairs.jsonl', rows, 0)}", "data.eval=null", "objective=dpo")


@case("data", "text rows under data.format prompt_completion", ("rows.jsonl:1", "prompt"))
def _(w): return train(w, f"data.train={w.rows('rows.jsonl', [{'text': 'a b c'}] * 20, 0)}",
                       "data.format=prompt_completion")


@case("data", "a damaged parquet file", ("broken.parquet",))
def _(w): return train(w, f"data.train={w.file('broken.parquet', b'PAR1 not really parquet')}")


@case("data", "a CSV without the columns", ("rows.csv", "completion"))
def _(w): return train(w, f"data.train={w.file('rows.csv', 'prompt,answer' + chr(10) + 'a,b' + chr(10))}",
                       "data.format=prompt_completion")


@case("data", "a .json file that is not an array", ("rows.json",))
def _(w): return train(w, f"data.train={w.file('rows.json', json.dumps({'prompt': 'a', 'completion': 'b'}))}")


@case("data", "shards of two file types in one directory", ("mixed",))
def _(w):
    w.rows("mixed/a.jsonl", [])
    w.file("mixed/b.csv", "prompt,completion\na,b\n")
    return train(w, f"data.train={w.dir / 'mixed'}")


@case("data", "a hub dataset without network", ("nobody/none", "save it to files"), env={"HF_HUB_OFFLINE": "1"})
def _(w): return train(w, "data.train=hf:nobody/none:train")


@case("data", "an unknown chat template name", ("data.chat_template",))
def _(w): return train(w, "data.chat_template=vicuna9")


@case("data", "a chat template file that is missing", ("data.chat_template", "tmpl.jinja"))
def _(w): return train(w, f"data.chat_template={w.dir / 'tmpl.jinja'}")


def without_template(w: Workspace) -> Path:
    """A model directory whose tokenizer has no chat template (as many base models')."""
    final = model_dir(w)
    config = final / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings.pop("chat_template", None)
    config.write_text(json.dumps(settings))
    for f in final.glob("chat_template.*"):
        f.unlink()
    return final


@case("data", "chat rows and a tokenizer without a template", ("chat template", "data.chat_template"), timeout=200)
def _(w):
    return train(w, "model.init=null", f"model.name_or_path={without_template(w)}", f"data.train={DEMO / 'chat.jsonl'}",
                 "data.eval=null", "run.name=chat")


@case("data", "max_length beyond the model's positions", ("data.max_length", "max_position_embeddings"))
def _(w): return train(w, "data.max_length=100000", "model.init.max_position_embeddings=128")


@case("data", "nothing left to learn after truncation", ("data.train", "data.max_length"))
def _(w):
    rows = [{"prompt": "word " * 60, "completion": " 1"}] * 20
    return train(w, f"data.train={w.rows('long.jsonl', rows, 0)}", "data.eval=null", "data.max_length=8")


@case("data", "alpaca rows without an output", ("bad.jsonl:1", "output"))
def _(w): return train(w, f"data.train={w.rows('bad.jsonl', [{'instruction': 'x'}] * 2, 0)}", "data.format=alpaca")


@case("data", "sharegpt rows without an assistant turn", ("bad.jsonl:1", "assistant"))
def _(w):
    row = {"conversations": [{"from": "human", "value": "hi"}]}
    return train(w, f"data.train={w.rows('bad.jsonl', [row] * 2, 0)}", "data.format=sharegpt",
                 "data.chat_template=chatml")


@case("data", "a mixture's second source missing", ("data.train.1", "not found"))
def _(w): return train(w, f"data.train=[{{path: {DEMO / 'train.jsonl'}}}, {{path: {w.dir / 'gone.jsonl'}}}]")


@case("data", "a bad row in a listed eval source", ("two.jsonl:21",))
def _(w):
    return train(w, f"data.eval=[{{path: {DEMO / 'eval.jsonl'}}}, {{path: {w.rows('two.jsonl', [{'prompt': 1}])}}}]")


@case("data", "a listed retention source missing", ("data.retention.1", "not found"))
def _(w): return train(w, f"data.retention=[{{path: {DEMO / 'general.txt'}}}, {{path: {w.dir / 'gone.txt'}}}]")


@case("data", "retention text that is empty", ("data.retention", "no text"))
def _(w): return train(w, f"data.retention={w.file('general.txt', chr(10) * 3)}")


@case("data", "replay text missing", ("regularization.replay.data", "not found"))
def _(w): return train(w, f"regularization.replay.data={w.dir / 'gone.txt'}")


@case("config", "EWC without retention text", ("regularization.ewc", "data.retention"))
def _(w): return train(w, "regularization.ewc.weight=1000")


@case("config", "replay fraction of all rows", ("regularization.replay.fraction",))
def _(w): return train(w, f"regularization.replay.data={DEMO / 'general.txt'}", "regularization.replay.fraction=1")


@case("data", "examples cut to max_length are told", ("were cut to it", "data.max_length 16"), outcome="runs")
def _(w):
    rows = [{"text": f"row {i}: " + "the river rises and the river falls " * 8} for i in range(40)]
    return train(w, f"data.train={w.rows('long.jsonl', rows, 0)}", "data.eval=null", "data.max_length=16")


@case("data", "the data path is a directory of text files", ("data.train",))
def _(w):
    w.file("notes/a.txt", "hello")
    return train(w, f"data.train={w.dir / 'notes'}")


@case("data", "an unsupported file type", ("data.train", "rows.xlsx"))
def _(w): return train(w, f"data.train={w.file('rows.xlsx', 'x')}")


# ---------------------------------------------------------------- model


def model_dir(w: Workspace) -> Path:
    """A real (tiny) model directory: a run's final model."""
    w.run("train", w.config("train.max_steps=1", "data.eval=null", "data.eval_fraction=0",
                            "checkpoint.every_steps=100", name="base.yaml"), "--local")
    return w.dir / "runs" / "case" / "final"


@case("model", "a model directory that does not exist", ("model.name_or_path",))
def _(w): return train(w, "model.init=null", f"model.name_or_path={w.dir / 'no-model'}")


@case("model", "a directory without config.json", ("model.name_or_path", "config.json"))
def _(w):
    (w.dir / "empty-model").mkdir()
    return train(w, "model.init=null", f"model.name_or_path={w.dir / 'empty-model'}")


@case("model", "truncated weights", ("model.safetensors",), timeout=200)
def _(w):
    final = model_dir(w)
    copy = w.dir / "damaged"
    shutil.copytree(final, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return train(w, "model.init=null", f"model.name_or_path={copy}", "run.name=second")


@case("model", "a hub id without network", ("someorg/somemodel", "HF_HUB_OFFLINE=1"),
      env={"HF_ENDPOINT": "http://127.0.0.1:1", "HF_HUB_OFFLINE": None})
def _(w): return train(w, "model.init=null", "model.name_or_path=someorg/somemodel", "method=lora")


@case("model", "a hub id in offline mode, not in the cache", ("someorg/somemodel", "HF_HUB_OFFLINE set"))
def _(w): return train(w, "model.init=null", "model.name_or_path=someorg/somemodel", "method=lora")


@case("model", "a tokenizer path that is missing", ("model.tokenizer",))
def _(w): return train(w, f"model.tokenizer={w.dir / 'no-tokenizer'}")


def with_own_code(w: Workspace) -> Path:
    """A real model directory whose config.json asks for code of its own (auto_map)."""
    final = model_dir(w)
    copy = w.dir / "own-code"
    shutil.copytree(final, copy)
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_own.OwnForCausalLM"}
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "modeling_own.py").write_text("raise SystemExit('its own code ran')\n")
    return copy


@case("model", "a model that ships its own code (auto_map)", ("own-code", "auto_map", "model.trust_remote_code: true"),
      timeout=200)
def _(w): return train(w, "model.init=null", f"model.name_or_path={with_own_code(w)}", "run.name=second")


@case("model", "ftdist plan of a model that ships its own code", ("own-code", "model.trust_remote_code: true"),
      timeout=200)
def _(w): return ["plan", w.config("model.init=null", f"model.name_or_path={with_own_code(w)}", "run.name=second")]


@case("model", "ftdist generate with a model that ships its own code",
      ("own-code", "--trust-remote-code", "model.trust_remote_code: true"), timeout=200)
def _(w): return ["generate", str(with_own_code(w)), "--prompt", "hi"]


class Planted:
    """A pickle whose unpickling would run code (here: create a file)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@case("model", "a base model's pytorch_model.bin holding a pickle", ("pytorch_model.bin", "other than tensors"),
      timeout=200)
def _(w):
    import torch

    copy = w.dir / "bin-model"
    shutil.copytree(model_dir(w), copy)
    (copy / "model.safetensors").unlink()
    torch.save({"payload": Planted(str(w.dir / "ran"))}, copy / "pytorch_model.bin")
    return train(w, "model.init=null", f"model.name_or_path={copy}", "run.name=second")


@case("model", "a model that cannot fit this machine", ("412.33B parameters", "GiB is free", "method: qlora"))
def _(w): return train(w, "model.init.hidden_size=16384", "model.init.num_layers=96", "model.init.num_heads=128")


@case("model", "lora target modules the model does not have", ("lora.target_modules", "not_a_module"))
def _(w): return train(w, "method=lora", "lora.target_modules=[not_a_module]")


# ---------------------------------------------------------------- storage


@case("storage", "an unreachable endpoint", ("storage.endpoint_url", "127.0.0.1:1", "storage.retry_deadline_s"))
def _(w):
    return train(w, "run.output=s3://bucket/runs", "storage.endpoint_url=http://127.0.0.1:1", "storage.retry_deadline_s=3")


@case("storage", "a bucket that does not exist", ("no-such-bucket",))
def _(w): return train(w, "run.output=s3://no-such-bucket/runs", *S3.overrides()[1:])


@case("storage", "no credentials", ("no AWS credentials", "AWS_ACCESS_KEY_ID"),
      env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
           "AWS_CONFIG_FILE": "/nonexistent"})
def _(w): return train(w, f"run.output=s3://{S3.bucket}/runs", *S3.overrides())


@case("storage", "credentials inside the endpoint URL are refused, not shown", ("storage.endpoint_url", "AWS_ACCESS_KEY_ID"))
def _(w):
    return train(w, "run.output=s3://bucket/runs", "storage.endpoint_url=http://user:hunter2@127.0.0.1:1",
                 "storage.retry_deadline_s=3")


@case("storage", "an s3:// data file that is missing", ("s3://", "missing.jsonl"))
def _(w): return train(w, f"data.train=s3://{S3.bucket}/missing.jsonl", *S3.overrides()[1:])


@case("storage", "an s3:// model without config.json", ("model.name_or_path", "config.json"))
def _(w):
    S3.put_text("empty-model/README", "no model here")
    return train(w, "model.init=null", f"model.name_or_path=s3://{S3.bucket}/empty-model", *S3.overrides()[1:])


@case("storage", "a bad bucket name", ("s3://Bad_Bucket!", "not a valid S3 bucket name"))
def _(w): return train(w, "run.output=s3://Bad_Bucket!/runs", *S3.overrides()[1:])


# ---------------------------------------------------------------- ray


@case("ray", "an address where nothing answers", ("no Ray cluster answers at 127.0.0.1:1", "ray start --head"))
def _(w): return ["train", w.config("distributed.workers=2"), "--address", "127.0.0.1:1"]


@case("ray", "RAY_ADDRESS where nothing answers", ("127.0.0.1:1", "RAY_ADDRESS"), env={"RAY_ADDRESS": "127.0.0.1:1"})
def _(w): return ["train", w.config("distributed.workers=2")]


@case("ray", "--address with --local", ("--address", "--local"))
def _(w): return ["train", w.config(), "--local", "--address", "127.0.0.1:6379"]


@case("ray", "a tune with --address where nothing answers", ("no Ray cluster answers",))
def _(w): return ["tune", tune_config(w), "--address", "127.0.0.1:1"]


@case("ray", "more workers than the cluster can place", ("workers", "CPU"), timeout=240)
def _(w): return ["train", w.config("distributed.workers=64")]


# ---------------------------------------------------------------- resume


def interrupted_run(w: Workspace) -> Path:
    """A run of 3 steps with complete checkpoints at steps 1 and 2, as if killed before its end."""
    w.run("train", w.config("train.max_steps=3"), "--local")
    run = w.dir / "runs" / "case"
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    return run


@case("resume", "a snapshot that is not valid YAML", ("config.yaml", "--restart"), timeout=200)
def _(w):
    run = interrupted_run(w)
    (run / "config.yaml").write_text("run: [broken\n")
    return train(w, "train.max_steps=3")


@case("resume", "a changed config on resume", ("different", "--restart"), timeout=200)
def _(w):
    interrupted_run(w)
    return train(w, "train.max_steps=3", "train.lr=0.5")


@case("resume", "the newest checkpoint's state.json is garbage", ("step-2", "state.json", "resuming from"),
      outcome="runs", timeout=200)
def _(w):
    run = interrupted_run(w)
    (run / "checkpoints" / "step-2" / "state.json").write_text("{garbage")
    return train(w, "train.max_steps=3")


@case("resume", "the newest checkpoint's weights were damaged", ("step-2", "model.safetensors", "resuming from"),
      outcome="runs", timeout=200)
def _(w):
    run = interrupted_run(w)
    for f in (run / "checkpoints" / "step-2").rglob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    return train(w, "train.max_steps=3")


@case("resume", "a pickle planted in the newest checkpoint, manifest rewritten to match",
      ("step-2", "optimizer.pt", "other than tensors", "resuming from"), outcome="runs", timeout=200)
def _(w):
    import torch

    from ftdist.training.checkpoint import manifest

    run = interrupted_run(w)
    step2 = run / "checkpoints" / "step-2"
    torch.save({"state": {}, "payload": Planted(str(w.dir / "ran"))}, step2 / "optimizer.pt")
    marker = json.loads((step2 / "COMPLETE").read_text())
    (step2 / "COMPLETE").write_text(json.dumps({**marker, "files": manifest(step2)}))
    return train(w, "train.max_steps=3")


@case("resume", "a checkpoint whose COMPLETE lacks the file list", ("step-2", "COMPLETE lists no files", "resuming from"),
      outcome="runs", timeout=200)
def _(w):
    run = interrupted_run(w)
    (run / "checkpoints" / "step-2" / "COMPLETE").write_text(json.dumps({"world_size": 1}))
    return train(w, "train.max_steps=3")


@case("resume", "the only checkpoint damaged", ("step-1", "the only checkpoint left", "--restart"), timeout=200)
def _(w):
    run = interrupted_run(w)
    shutil.rmtree(run / "checkpoints" / "step-2")
    (run / "checkpoints" / "step-1" / "state.json").write_text("{}")
    return train(w, "train.max_steps=3")


@case("resume", "--restart on a directory ftdist did not write", ("thesis.tex", "not an ftdist run"))
def _(w):
    (w.dir / "runs" / "case").mkdir(parents=True)
    (w.dir / "runs" / "case" / "thesis.tex").write_text("years of work")
    return ["train", w.config(), "--local", "--restart"]


@case("resume", "the run directory is a file", ("runs/case is a file", "run.output"))
def _(w):
    (w.dir / "runs").mkdir()
    (w.dir / "runs" / "case").write_text("a file")
    return train(w)


@case("resume", "export of a run without a model or checkpoint", ("runs/case", "neither a run directory"))
def _(w):
    (w.dir / "runs" / "case").mkdir(parents=True)
    return ["export", str(w.dir / "runs" / "case"), "--out", str(w.dir / "out")]


@case("resume", "export into a non-empty directory", ("--out", "--force"), timeout=200)
def _(w):
    w.run("train", w.config(), "--local")
    run = w.dir / "runs" / "case"
    w.file("out/keep.txt", "mine")
    return ["export", str(run), "--out", str(w.dir / "out")]


# ---------------------------------------------------------------- links


def users_folder(w: Workspace) -> Path:
    """A folder of the user's, which a link planted in a run points at."""
    w.file("mine/thesis.tex", "years of work")
    return w.dir / "mine"


def a_run(w: Workspace, *overrides: str) -> Path:
    """A run directory as ftdist makes it (its marker and snapshot), nothing trained yet."""
    from ftdist.config.load import validate_config
    from ftdist.launch.rundir import prepare_run_dir

    return prepare_run_dir(validate_config(w.raw(*overrides)), restart=False).local


def planted(w: Workspace, name: str, target: Path) -> Path:
    """A run with a symbolic link at `name` in it."""
    run = a_run(w)
    (run / name).symlink_to(target)
    return run


@case("links", "metrics.jsonl a link to the user's file", ("metrics.jsonl is a symbolic link", "thesis.tex",
                                                          "never writes through a link"))
def _(w):
    planted(w, "metrics.jsonl", users_folder(w) / "thesis.tex")
    return train(w)


@case("links", "final.tmp a link to the user's folder", ("final.tmp is a symbolic link", "mine", "remove the link"))
def _(w):
    planted(w, "final.tmp", users_folder(w))
    return train(w)


@case("links", "checkpoints/ a link to the user's folder", ("checkpoints is a symbolic link", "mine"))
def _(w):
    planted(w, "checkpoints", users_folder(w))
    return train(w)


@case("links", "tensorboard/ a link to the user's folder", ("tensorboard is a symbolic link", "mine"))
def _(w):
    planted(w, "tensorboard", users_folder(w))
    return train(w, "logging.tensorboard=true")


@case("links", "the run directory itself a link to the user's folder",
      ("runs/case is a symbolic link", "mine", "run.name mine"), suite=True)
def _(w):
    (w.dir / "runs").mkdir()
    (w.dir / "runs" / "case").symlink_to(users_folder(w))
    return ["train", w.config(), "--local", "--restart"]


@case("links", "--restart with final/ a link to the user's folder", ("final is a symbolic link", "mine"))
def _(w):
    planted(w, "final", users_folder(w))
    return ["train", w.config(), "--local", "--restart"]


@case("links", "export --out a link to the user's folder", ("--out", "is a symbolic link", "mine"), timeout=200)
def _(w):
    w.run("train", w.config(), "--local")
    (w.dir / "out").symlink_to(users_folder(w))
    return ["export", str(w.dir / "runs" / "case"), "--out", str(w.dir / "out"), "--force"]


@case("links", "metrics.jsonl a FIFO (no hang)", ("metrics.jsonl is not a regular file",))
def _(w):
    os.mkfifo(a_run(w) / "metrics.jsonl")
    return train(w)


@case("links", "the prepared cache entry a link to the user's folder", ("is a symbolic link", "mine"), suite=True)
def _(w):
    from ftdist.config.load import validate_config
    from ftdist.data.prepared import cache_root, data_key

    cfg = validate_config(w.raw())
    cache_root(cfg).mkdir(parents=True)
    (cache_root(cfg) / data_key(cfg)).symlink_to(users_folder(w))
    return ["prepare", w.config()]


@case("links", "run.output through a link is the user's own choice: it runs", ("done: model in",), outcome="runs",
      timeout=200)
def _(w):
    (w.dir / "disk").mkdir()
    (w.dir / "linked").symlink_to(w.dir / "disk")
    return train(w, f"run.output={w.dir / 'linked'}")


# ---------------------------------------------------------------- writers

HOLDER = """
import sys, time
from pathlib import Path
from ftdist.io import runlock
lock, seconds = Path(sys.argv[1]), float(sys.argv[2])
sys.argv = ["ftdist", "train", "first.yaml"]  # the command line a lock names its holder by
runlock.lock_file(lock, lambda h: "busy")
time.sleep(seconds)
"""


def locked(w: Workspace, run: Path, seconds: float = 300):
    """Another process holding `run`'s lock (as a running writer does)."""
    from ftdist.io import runlock
    from ftdist.io.layout import LOCK_FILE

    run.mkdir(parents=True, exist_ok=True)
    return w.start(sys.executable, "-c", HOLDER, str(run / LOCK_FILE), str(seconds),
                   ready=lambda: runlock.lock_holder(run / LOCK_FILE) is not None)


@case("writers", "a second train of a run that is training", ("is being written by", "ftdist train", "pid",
                                                              "one writer at a time"), timeout=300, suite=True)
def _(w):
    from ftdist.io import runlock

    lock = w.dir / "runs" / "case" / ".ftdist-lock"
    w.start(*FTDIST, "train", w.config("train.max_steps=100000", "checkpoint.every_steps=100000"), "--local",
            ready=lambda: bool(runlock.lock_holder(lock)))
    return train(w)


@case("writers", "--restart of a run that another process writes", ("is being written by", "first.yaml"), suite=True)
def _(w):
    locked(w, w.dir / "runs" / "case")
    return ["train", w.config(), "--local", "--restart"]


@case("writers", "a train into a tune search's directory", ("tune search's directory", "never writes into it",
                                                           "run.name"), suite=True)
def _(w):
    from ftdist.config.load import validate_config
    from ftdist.launch.rundir import SEARCH, TUNE_RESUMABLE_CHANGES, prepare_run_dir

    prepare_run_dir(validate_config(w.raw()), restart=False, resumable=TUNE_RESUMABLE_CHANGES, kind=SEARCH)
    return ["train", w.config("train.lr=0.5"), "--local", "--restart"]


@case("writers", "a train into a trial of a search", ("tune search's directory", "trial-N"), suite=True)
def _(w):
    from ftdist.config.load import validate_config
    from ftdist.launch.rundir import SEARCH, TUNE_RESUMABLE_CHANGES, prepare_run_dir

    search = prepare_run_dir(validate_config(w.raw("run.name=search")), restart=False,
                             resumable=TUNE_RESUMABLE_CHANGES, kind=SEARCH)
    return train(w, f"run.output={search.local}", "run.name=trial-00001")


@case("writers", "a tune into a training run's directory", ("training run's directory", "tune.name"), timeout=200, suite=True)
def _(w):
    a_run(w, "run.name=search")
    return ["tune", tune_config(w)]


@case("writers", "--restart while an export reads the run", ("being read by another process", "export"))
def _(w):
    w.file("runs/case/.ftdist-run", "{}")
    reader = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_SH); "
              "open(sys.argv[2], 'w').close(); time.sleep(300)")
    ready = w.dir / "reading"
    w.start(sys.executable, "-c", reader, str(w.dir / "runs" / "case"), str(ready), ready=ready.exists)
    return ["train", w.config(), "--local", "--restart"]


@case("writers", "a lock left by a killed writer is taken over", ("done: model in",), outcome="runs", timeout=200)
def _(w):
    holder = locked(w, w.dir / "runs" / "case")
    holder.kill()
    holder.wait(30)
    return train(w)


@case("writers", "a second prepare of a model.init run being prepared", ("is being written by", "first.yaml"), suite=True)
def _(w):
    locked(w, w.dir / "runs" / "case")
    return ["prepare", w.config()]


@case("writers", "a second train of an s3:// run that holds a live lease", ("is being written by",
                                                                            "ftdist train other.yaml", "pid 4242"))
def _(w):
    lease = {"host": "node-7", "pid": 4242, "command": "ftdist train other.yaml", "since": "2026-01-01 10:00:00",
             "token": "x", "expires": time.time() + 3600}
    S3.put_text(f"runs/writers-{w.dir.name}/.ftdist-lease.json", json.dumps(lease))
    return train(w, *S3.overrides(), f"run.name=writers-{w.dir.name}")


# ---------------------------------------------------------------- tune


def tune_config(w: Workspace, **tune) -> str:
    raw = w.raw("distributed.workers=1")
    raw["tune"] = {"name": "search", "num_samples": 2, "metric": "eval_loss",
                   "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}, **tune}
    return w.config(raw=raw, name="tune.yaml")


@case("tune", "an unknown space key", ("train.lrr", "did you mean"))
def _(w): return ["tune", tune_config(w, space={"train.lrr": {"choice": [1, 2]}})]


@case("tune", "a key that cannot be searched", ("data.max_length", "cannot be searched"))
def _(w): return ["tune", tune_config(w, space={"data.max_length": {"choice": [64, 128]}})]


@case("tune", "an unknown distribution", ("train.lr",))
def _(w): return ["tune", tune_config(w, space={"train.lr": {"gaussian": [0, 1]}})]


@case("tune", "forgetting without retention", ("data.retention",))
def _(w): return ["tune", tune_config(w, metric="eval_loss_plus_forgetting")]


@case("tune", "no eval data", ("eval loss", "data.eval"))
def _(w):
    raw = w.raw("distributed.workers=1", "data.eval=null", "data.eval_fraction=0")
    raw["tune"] = {"name": "s", "space": {"train.lr": {"choice": [1e-3, 1e-2]}}}
    return ["tune", w.config(raw=raw)]


@case("tune", "zero samples", ("tune.num_samples",))
def _(w): return ["tune", tune_config(w, num_samples=0)]


@case("tune", "a config without a tune section", ("tune",))
def _(w): return ["tune", w.config()]


@case("tune", "a choice with no values", ("train.lr",))
def _(w): return ["tune", tune_config(w, space={"train.lr": {"choice": []}})]


@case("tune", "a weight of a source that is not there", ("data.train.3.weight",))
def _(w): return ["tune", tune_config(w, space={"data.train.3.weight": {"uniform": [0.1, 0.5]}})]


@case("tune", "a range the wrong way round", ("train.lr",))
def _(w): return ["tune", tune_config(w, space={"train.lr": {"loguniform": [1e-2, 1e-4]}})]


@case("tune", "a freeze depth beyond the model", ("freeze_layers",))
def _(w): return ["tune", tune_config(w, space={"freeze_layers": {"choice": [0, 9]}})]


# ---------------------------------------------------------------- cli


@case("cli", "generate from a directory that does not exist", ("no-model", "no such directory"))
def _(w): return ["generate", str(w.dir / "no-model"), "--prompt", "hi"]


@case("cli", "report on a directory without metrics", ("metrics.jsonl",))
def _(w):
    (w.dir / "empty-run").mkdir()
    return ["report", str(w.dir / "empty-run")]


@case("cli", "prepare with a missing data file", ("data.train", "not found"))
def _(w): return ["prepare", w.config(f"data.train={w.dir / 'gone.jsonl'}")]


@case("cli", "plan with a config error", ("train.lr",))
def _(w): return ["plan", w.config(raw={**w.raw(), "train": {"lr": "fast"}})]


@case("cli", "plan for a model that cannot fit", ("does not fit", "offload_optimizer"), outcome="refuses", timeout=60)
def _(w):
    return ["plan", w.config("model.init.hidden_size=16384", "model.init.num_layers=96", "model.init.num_heads=128"),
            "--gpu-memory", "24"]


@case("cli", "generate --chat without a chat template", ("chat template", "--chat"), timeout=200)
def _(w): return ["generate", str(without_template(w)), "--prompt", "hi", "--chat"]


@case("cli", "export of a missing source", ("gone",))
def _(w): return ["export", str(w.dir / "gone"), "--out", str(w.dir / "out")]


# ---------------------------------------------------------------- tracebacks
# Faults that once ended in a traceback where one message belongs. `unprivileged`: the command
# runs without root's power over file permissions (as root, setpriv drops CAP_DAC_OVERRIDE and
# CAP_DAC_READ_SEARCH: a chmod then holds for it too); `fsize`: a file-size limit stands in for
# a full disk (the same EFBIG/ENOSPC path, without a filesystem of its own).


ESCAPE = "{{ messages.__class__.__mro__[1].__subclasses__() }}"  # Jinja's sandbox refuses this


@case("tracebacks", "a chat template that reaches outside the sandbox", ("data.chat_template", "escape.jinja",
                                                                          "Jinja's sandbox"), suite=True)
def _(w):
    return train(w, f"data.train={DEMO / 'chat.jsonl'}", "data.eval=null",
                 f"data.chat_template={w.file('escape.jinja', ESCAPE)}")


@case("tracebacks", "a chat template that changes the conversation", ("data.chat_template", "mutate.jinja",
                                                                      "Jinja's sandbox"), suite=True)
def _(w):
    template = "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages[0].content }}"
    return train(w, f"data.train={DEMO / 'chat.jsonl'}", "data.eval=null",
                 f"data.chat_template={w.file('mutate.jinja', template)}")


@case("tracebacks", "a chat template that is not valid Jinja", ("data.chat_template", "broken.jinja", "line 1"), suite=True)
def _(w):
    return train(w, f"data.train={DEMO / 'chat.jsonl'}", "data.eval=null",
                 f"data.chat_template={w.file('broken.jinja', '{% for m in messages %}{{ m.content }}')}")


@case("tracebacks", "generate --chat with a model whose template escapes", ("chat template", "Jinja's sandbox"),
      timeout=200)
def _(w):
    final = model_dir(w)
    config = final / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": ESCAPE}))
    for f in final.glob("chat_template.*"):
        f.unlink()
    return ["generate", str(final), "--prompt", "hi", "--chat"]


@case("tracebacks", "a data file that cannot be read", ("data.train", "locked.jsonl", "ermission"),
      unprivileged=True, suite=True)
def _(w):
    path = w.rows("locked.jsonl", [])
    os.chmod(path, 0)
    return train(w, f"data.train={path}")


@case("tracebacks", "a data directory that cannot be listed", ("data.train", "shards", "ermission"),
      unprivileged=True, suite=True)
def _(w):
    w.rows("shards/a.jsonl", [])
    os.chmod(w.dir / "shards", 0)
    return train(w, f"data.train={w.dir / 'shards'}")


@case("tracebacks", "a run directory that cannot be written", ("run.output", "locked-runs", "ermission"),
      unprivileged=True, suite=True)
def _(w):
    (w.dir / "locked-runs").mkdir(mode=0o555)
    return train(w, f"run.output={w.dir / 'locked-runs'}")


@case("tracebacks", "a cache directory that cannot be written", ("storage.cache_dir", "locked-cache", "ermission"),
      unprivileged=True, suite=True)
def _(w):
    (w.dir / "locked-cache").mkdir(mode=0o555)
    return train(w, f"storage.cache_dir={w.dir / 'locked-cache'}")


@case("tracebacks", "ftdist prepare into a cache that cannot be written", ("storage.cache_dir", "locked-cache"),
      unprivileged=True, suite=True)
def _(w):
    (w.dir / "locked-cache").mkdir(mode=0o555)
    return ["prepare", w.config(f"storage.cache_dir={w.dir / 'locked-cache'}")]


@case("tracebacks", "report on a directory that cannot be written", ("runs/case", "ermission"), unprivileged=True,
      timeout=200)
def _(w):
    w.run("train", w.config(), "--local")
    os.chmod(w.dir / "runs" / "case", 0o555)
    return ["report", str(w.dir / "runs" / "case")]


@case("tracebacks", "a config file that cannot be read", ("config.yaml", "ermission"), unprivileged=True, suite=True)
def _(w):
    path = w.config()
    os.chmod(path, 0)
    return ["train", path, "--local"]


@case("tracebacks", "a chat template file that cannot be read", ("data.chat_template", "tmpl.jinja", "ermission"),
      unprivileged=True, suite=True)
def _(w):
    path = w.file("tmpl.jinja", "{{ messages }}")
    os.chmod(path, 0)
    return train(w, f"data.train={DEMO / 'chat.jsonl'}", "data.eval=null", f"data.chat_template={path}")


@case("tracebacks", "retention text that cannot be read", ("data.retention", "general.txt", "ermission"),
      unprivileged=True, suite=True)
def _(w):
    path = w.file("general.txt", (DEMO / "general.txt").read_text())
    os.chmod(path, 0)
    return train(w, f"data.retention={path}")


@case("tracebacks", "resuming a run whose directory cannot be written", ("runs/case", "ermission"),
      unprivileged=True, timeout=200)
def _(w):
    run = interrupted_run(w)
    os.chmod(run, 0o555)
    return train(w, "train.max_steps=3")


FSIZE = 64 * 1024  # bytes: above every small file a run writes, below the tiny model's weights and rows


@case("tracebacks", "a full disk while writing final/", ("final", "no room", "run the same command again"),
      fsize=FSIZE, timeout=200)
def _(w):
    w.run("prepare", w.config())  # base/ and the prepared rows written before the limit
    return train(w, "checkpoint.every_steps=100")


@case("tracebacks", "a full disk while writing base/", ("base", "no room"), fsize=FSIZE)
def _(w): return train(w)


@case("tracebacks", "a full disk while writing the prepared cache", ("storage.cache_dir", "no room"), fsize=FSIZE,
      timeout=200)
def _(w):
    w.run("prepare", w.config("data.max_length=48"))  # base/ written before the limit
    return ["prepare", w.config()]


@case("tracebacks", "HOME that is not a directory", ("HOME", "/dev/null"), env={"HOME": "/dev/null"}, suite=True)
def _(w):
    raw = w.raw()
    del raw["storage"]
    return ["train", w.config(raw=raw), "--local"]


@case("tracebacks", "a negative seed", ("train.seed", "4294967295"), suite=True)
def _(w): return train(w, "train.seed=-1")


@case("tracebacks", "a seed beyond 2^32-1", ("train.seed", "4294967295"), suite=True)
def _(w): return train(w, f"train.seed={2**32}")


@case("tracebacks", "lora.target_modules: []", ("lora.target_modules", "all-linear"), suite=True)
def _(w): return train(w, "method=lora", "lora.target_modules=[]")


@case("tracebacks", "a mixture weight of inf", ("data.train.0.weight",), suite=True)
def _(w): return train(w, f"data.train=[{{path: {DEMO / 'train.jsonl'}, weight: .inf}}, "
                          f"{{path: {DEMO / 'eval.jsonl'}, weight: 1}}]")


@case("tracebacks", "a learning rate of nan", ("train.lr",), suite=True)
def _(w): return train(w, "train.lr=.nan")


@case("tracebacks", "a lone UTF-16 surrogate in a row", ("bad.jsonl:21", "surrogate", "data.skip_bad_rows"), suite=True)
def _(w):
    lone = '{"prompt": "a", "completion": "b \\ud800"}'  # JSON's escape of half a surrogate pair
    return train(w, f"data.train={w.rows('bad.jsonl', [lone])}")


@case("tracebacks", "labels that read as integers but are not (--1, ²)", ("done: model in",), outcome="runs")
def _(w):
    rows = [{"text": f"text {i}", "label": ["--1", "2", "²"][i % 3]} for i in range(30)]
    return train(w, f"data.train={w.rows('rows.jsonl', rows, 0)}", "data.eval=null", "data.packing=false",
                 "task=classification")


@case("tracebacks", "a 300-character run name", ("run.name",), suite=True)
def _(w): return train(w, "run.name=" + "a" * 300)


@case("tracebacks", "generate --max-new-tokens -1", ("--max-new-tokens",), suite=True)
def _(w):
    (w.dir / "model").mkdir()
    return ["generate", str(w.dir / "model"), "--prompt", "hi", "--max-new-tokens", "-1"]


@case("tracebacks", "generate with an empty prompt", ("--prompt",), suite=True)
def _(w):
    (w.dir / "model").mkdir()
    return ["generate", str(w.dir / "model"), "--prompt", ""]


@case("tracebacks", "generate --temperature -1", ("--temperature",), suite=True)
def _(w):
    (w.dir / "model").mkdir()
    return ["generate", str(w.dir / "model"), "--prompt", "hi", "--temperature", "-1"]


@case("tracebacks", "generate --seed beyond 2^32-1", ("--seed", "4294967295"), suite=True)
def _(w):
    (w.dir / "model").mkdir()
    return ["generate", str(w.dir / "model"), "--prompt", "hi", "--seed", str(2**32)]


@case("tracebacks", "generate --prompt that is not UTF-8", ("--prompt", "UTF-8"), suite=True)
def _(w):
    (w.dir / "model").mkdir()
    return ["generate", str(w.dir / "model"), "--prompt", os.fsdecode(b"caf\xe9")]


@case("tracebacks", "classify with an empty --text", ("--text", "empty"), suite=True)
def _(w):
    (w.dir / "model").mkdir()
    return ["classify", str(w.dir / "model"), "--text", " "]


@case("tracebacks", "plan --gpu-memory 0", ("--gpu-memory",), suite=True)
def _(w): return ["plan", w.config(), "--gpu-memory", "0"]


@case("tracebacks", "plan --gpu-memory -5", ("--gpu-memory",), suite=True)
def _(w): return ["plan", w.config(), "--gpu-memory", "-5"]


@case("tracebacks", "plan --gpu-memory nan", ("--gpu-memory",), suite=True)
def _(w): return ["plan", w.config(), "--gpu-memory", "nan"]


@case("tracebacks", "plan --workers -1", ("--workers",), suite=True)
def _(w): return ["plan", w.config(), "--workers", "-1"]


# ---------------------------------------------------------------- results (issue 35)


def no_final(w: Workspace, done) -> Optional[str]:
    """A run that stopped must leave no final/ and no summary (they would read as its result)."""
    left = [p.name for p in (w.dir / "runs" / "case" / "final", w.dir / "runs" / "case" / "summary.json")
            if p.exists()]
    return f"it left {', '.join(left)}" if left else None


def eval_rows_cut_away(w: Workspace, name: str = "long.jsonl") -> str:
    """Eval rows whose prompts fill data.max_length: no completion token is left to evaluate."""
    rows = [json.loads(x) for x in (DEMO / "eval.jsonl").read_text().splitlines()]
    return w.file(name, "".join(json.dumps({**r, "prompt": "word " * 200 + r["prompt"]}) + "\n" for r in rows))


@case("results", "train.lr 1e9: the eval loss goes nan, the run stops, no final/",
      ("diverged", "eval loss is nan", "last good checkpoint", "checkpoints/step-1", "lower train.lr (now 1e+09",
       "--restart"), after=no_final, timeout=200)
def _(w): return train(w, "train.lr=1e9", "train.max_steps=4")


@case("results", "train.lr 1e9 without evaluations: the training loss stops it",
      ("diverged", "training loss is nan", "lower train.lr"), after=no_final, timeout=200)
def _(w): return train(w, "train.lr=1e9", "train.max_steps=6", "train.warmup_steps=0", "train.eval_every=100",
                       "data.eval=null", "data.eval_fraction=0")


@case("results", "an eval file whose every example is truncated away", ("data.eval", "long.jsonl",
      "no token to evaluate", "data.max_length 64"), after=no_final, timeout=200)
def _(w): return train(w, f"data.eval={eval_rows_cut_away(w)}")


@case("results", "a listed eval source truncated away", ("data.eval.1", "long.jsonl", "no token to evaluate"),
      after=no_final, timeout=200)
def _(w): return train(w, f"data.eval=[{{path: {DEMO / 'eval.jsonl'}}}, {{path: {eval_rows_cut_away(w)}}}]")


def excel_csv(w: Workspace, header: str = "prompt,completion") -> str:
    """A CSV as Excel's "CSV UTF-8" saves it: a byte-order mark, then CRLF lines."""
    rows = [json.loads(x) for x in PROMPTS[:200]]
    lines = [header] + [f"{r['prompt']},{r['completion']}" for r in rows]
    return w.file("rows.csv", b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")


def prompts_kept(w: Workspace, done) -> Optional[str]:
    start = next(json.loads(x) for x in (w.dir / "runs" / "case" / "metrics.jsonl").read_text().splitlines())
    return None if start.get("format") == "prompt_completion" and not start.get("dropped_no_target") else \
        f"the rows were read as {start.get('format')}"


@case("results", "a CSV saved by Excel (byte-order mark) keeps its prompt column", ("done: model in",),
      outcome="runs", after=prompts_kept, timeout=200)
def _(w): return train(w, f"data.train={excel_csv(w)}", "data.eval=null")


@case("results", "a JSONL file with a byte-order mark", ("done: model in",), outcome="runs", timeout=200)
def _(w): return train(w, f"data.train={w.file('rows.jsonl', chr(0xFEFF) + chr(10).join(PROMPTS[:200]) + chr(10))}",
                       "data.eval=null")


@case("results", "CSV columns that match no format in full are named", ("rows.csv:2", '"prompt" must be a string, and is missing',
      "Prompt", "data.columns"), suite=True)
def _(w): return train(w, f"data.train={excel_csv(w, 'Prompt,completion')}", "data.eval=null")


# ---------------------------------------------------------------- bounds (issue 35)


def alias_bomb(levels: int = 9) -> str:
    """A few hundred bytes of YAML that expand to 9**levels values."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@case("bounds", "a YAML alias bomb (a few hundred bytes)", ("config.yaml", "more than 100,000 values",
      "aliases"), timeout=20, suite=True)
def _(w):
    raw = w.raw()
    text = alias_bomb() + yaml.safe_dump(raw, sort_keys=False).replace(f"train: {raw['data']['train']}", "train: *a8")
    return ["train", w.file("config.yaml", text), "--local"]


@case("bounds", "an alias bomb in a --set value", ("--set data.train", "more than 100,000 values"), timeout=20, suite=True)
def _(w):
    flow = "{a: &a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcdef", "bcdefg")) + "}"
    return ["train", w.config(), "--local", "--set", f"data.train={flow}"]


@case("bounds", "an alias that contains itself", ("config.yaml", "contains it"), timeout=20, suite=True)
def _(w): return ["train", w.file("config.yaml", Path(w.config()).read_text() + "loop: &l [1, *l]\n"), "--local"]


@case("bounds", "a config file of megabytes", ("config.yaml", "MiB is not a config file"), timeout=20, suite=True)
def _(w): return ["train", w.file("config.yaml", Path(w.config()).read_text() + "#" + "x" * (3 << 20) + "\n"),
                  "--local"]


def short_message(w: Workspace, done) -> Optional[str]:
    return None if len(done.stderr) < 2000 else f"a message of {len(done.stderr)} characters"


@case("bounds", "a value of a megabyte is echoed in one line", ("train.lr", "..."), after=short_message, timeout=20, suite=True)
def _(w):
    raw = w.raw()
    raw["train"]["lr"] = "fast" * 250_000
    return ["train", w.config(raw=raw), "--local"]


@case("bounds", "a 10 MB single row trains in bounded time", ("were cut to it",), outcome="runs", timeout=120)
def _(w):
    rows = [json.loads(x) for x in PROMPTS[:40]] + [{"prompt": "x", "completion": "abcdefghij" * 1_000_000}]
    return train(w, f"data.train={w.file('big.jsonl', ''.join(json.dumps(r) + chr(10) for r in rows))}",
                 "data.eval=null")


@case("bounds", "a 10 MB chat turn trains in bounded time", ("were cut to it",), outcome="runs", timeout=120)
def _(w):
    rows = [{"messages": [{"role": "user", "content": json.loads(x)["prompt"]},
                          {"role": "assistant", "content": json.loads(x)["completion"]}]} for x in PROMPTS[:40]]
    rows.append({"messages": [{"role": "user", "content": "hi " * 3_500_000}, {"role": "assistant", "content": "ok"}]})
    return train(w, f"data.train={w.file('chat.jsonl', ''.join(json.dumps(r) + chr(10) for r in rows))}",
                 "data.eval=null", "data.chat_template=chatml")


# ---------------------------------------------------------------- lies (issue 35)


@case("lies", "YAML merge keys (<<: *defaults) are YAML", ("done: model in",), outcome="runs", timeout=200)
def _(w):
    raw = w.raw()
    steps = raw.pop("train")
    text = ("x-defaults: &defaults\n" + "".join(f"  {k}: {v}\n" for k, v in steps.items())
            + yaml.safe_dump(raw, sort_keys=False) + "train:\n  <<: *defaults\n  max_steps: 1\n")
    return ["train", w.file("config.yaml", text), "--local"]


def output_expanded(w: Workspace, done) -> Optional[str]:
    if any("$" in p.name for p in w.dir.rglob("*")):
        return "a directory named after the variable"
    return None if (w.dir / "expanded" / "case" / "final").is_dir() else "no run in the expanded run.output"


@case("lies", "run.output: $VAR/runs is expanded", ("done: model in",), outcome="runs", after=output_expanded,
      timeout=200)
def _(w):
    w.env["BATTERY_RUN_HOME"] = str(w.dir)
    return train(w, "run.output=$BATTERY_RUN_HOME/expanded")


def no_dollar_directory(w: Workspace, done) -> Optional[str]:
    return "a directory named after the variable" if any("$" in p.name for p in w.dir.rglob("*")) else None


@case("lies", "run.output: $VAR/runs with VAR unset is named", ("run.output", "$BATTERY_UNSET is not set"),
      env={"BATTERY_UNSET": None}, after=no_dollar_directory, suite=True)
def _(w): return train(w, "run.output=${BATTERY_UNSET}/runs")


@case("lies", "an apikey in a tracker URL is redacted from the error",
      ("logging.mlflow", "127.0.0.1:1", "apikey=***"), absent=("sk-battery-7f3a", "hunter2"), suite=True)
def _(w): return train(w, "logging.mlflow={tracking_uri: 'http://bob:hunter2@127.0.0.1:1/?apikey=sk-battery-7f3a'}")


@case("lies", "a FIFO as the data file", ("data.train", "rows.jsonl", "FIFO"), timeout=30, suite=True)
def _(w):
    os.mkfifo(w.dir / "rows.jsonl")
    return train(w, f"data.train={w.dir / 'rows.jsonl'}")


def finished_run(w: Workspace) -> Path:
    w.run("train", w.config("train.max_steps=1", "train.eval_every=1", name="first.yaml"), "--local")
    return w.dir / "runs" / "case"


@case("lies", "generate of a run directory uses its final/", ("using its model", "final"), outcome="runs",
      timeout=200)
def _(w): return ["generate", str(finished_run(w)), "--prompt", "reverse 12", "--max-new-tokens", "2"]


@case("lies", "generate of an unfinished run directory says where its model will be",
      ("has not finished", "final", "ftdist export"), timeout=200)
def _(w): return ["generate", str(interrupted_run(w)), "--prompt", "hi"]


def summary_rebuilt(w: Workspace, done) -> Optional[str]:
    summary = w.dir / "runs" / "case" / "summary.json"
    if not summary.is_file():
        return "no summary.json"
    return None if "eval_loss" in json.loads(summary.read_text()) else "a summary without the eval loss"


@case("lies", "a run stopped between final/ and its summary finishes from final/",
      ("finishing from final/", "done: model in", "eval_loss"), outcome="runs", after=summary_rebuilt, timeout=200)
def _(w):
    run = finished_run(w)
    (run / "summary.json").unlink()
    return train(w, "train.max_steps=1", "train.eval_every=1", config=str(w.dir / "first.yaml"))


# ---------------------------------------------------------------- the runner


class Store:
    """The S3 cases' store: a real moto_server on loopback, one bucket."""

    bucket = "battery"

    def __init__(self):
        self.server = None

    def start(self, log: Path) -> None:
        import s3fs

        from tests.s3server import MotoServer

        self.server = MotoServer(log)  # stopped by stop(), whatever happens next
        os.environ.update(AWS_ACCESS_KEY_ID="battery", AWS_SECRET_ACCESS_KEY="battery-secret",
                          AWS_DEFAULT_REGION="us-east-1")
        self.fs = s3fs.S3FileSystem(endpoint_url=self.server.url, use_listings_cache=False, skip_instance_cache=True)
        self.fs.mkdir(self.bucket)

    def overrides(self) -> list[str]:
        return [f"run.output=s3://{self.bucket}/runs", f"storage.endpoint_url={self.server.url}",
                "storage.region=us-east-1", "storage.retry_deadline_s=5"]

    def put_text(self, rel: str, text: str) -> None:
        self.fs.pipe_file(f"{self.bucket}/{rel}", text.encode())

    def stop(self) -> None:
        if self.server:
            self.server.stop()


S3 = Store()


def without_root(c: Case) -> list[str]:
    """The prefix that makes a root process obey file permissions, as any user's does: setpriv
    dropping the capabilities that override them (none needed when not root)."""
    if not c.unprivileged or os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def file_size_limit(limit: Optional[int]) -> Optional[Callable[[], None]]:
    if limit is None:
        return None

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_case(c: Case, root: Path, base_env: dict) -> Result:
    env = dict(base_env)
    for k, v in c.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    where = root / f"{c.family}-{CASES.index(c):03d}"
    where.mkdir()
    w = Workspace(where, env)
    started = time.monotonic()
    try:
        argv = [str(a) for a in c.make(w)]
        done = subprocess.run(without_root(c) + FTDIST + argv, capture_output=True, text=True, env=env, cwd=where,
                              timeout=c.timeout, preexec_fn=file_size_limit(c.fsize))
    except subprocess.TimeoutExpired:
        return Result(c, False, time.monotonic() - started, f"no answer within {c.timeout} s (a hang)", "")
    except Exception as e:  # the case's own set-up failed
        return Result(c, False, time.monotonic() - started, f"set-up: {e}"[:300], "")
    finally:
        for proc in w.background:
            proc.kill()
            proc.wait(30)
    seconds = time.monotonic() - started
    out, err = done.stdout, done.stderr
    errors = [line for line in err.splitlines() if line.startswith("ftdist: error:")]
    message = "\n".join(line for line in err.splitlines() if line.strip())[:600]
    problems = []
    if "Traceback" in out + err:
        problems.append("a traceback")
    if c.outcome == "error":
        if done.returncode != 2:
            problems.append(f"exit {done.returncode}, not 2")
        if len(errors) != 1:
            problems.append(f"{len(errors)} 'ftdist: error:' lines, not 1")
        missing = [f for f in c.expect if f not in err]
    elif c.outcome == "refuses":  # a report that ends in "no" (ftdist plan): exit 2, the reason on stdout
        if done.returncode != 2:
            problems.append(f"exit {done.returncode}, not 2")
        missing = [f for f in c.expect if f not in out + err]
        message = "\n".join(line for line in out.splitlines() if any(f in line for f in c.expect))[:600]
    else:
        if done.returncode != 0:
            problems.append(f"exit {done.returncode}, not 0")
        missing = [f for f in c.expect if f not in out + err]
        message = "\n".join(line for line in (out + err).splitlines()
                            if any(f in line for f in c.expect))[:600] or message
    if missing:
        problems.append("the message lacks " + ", ".join(repr(m) for m in missing))
    shown = [f for f in c.absent if f in out + err]
    if shown:
        problems.append("the output shows " + ", ".join(repr(f) for f in shown))
    if c.after is not None:
        problem = c.after(w, done)
        if problem:
            problems.append(problem)
    return Result(c, not problems, seconds, "; ".join(problems), message)


def case_env(root: Path) -> dict:
    """The environment every case's command runs in: this checkout, the battery's own store
    credentials, no hub, Ray's files under `root`."""
    return dict(os.environ, PYTHONPATH=str(ROOT), AWS_ACCESS_KEY_ID="battery", AWS_SECRET_ACCESS_KEY="battery-secret",
                AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", HF_HUB_OFFLINE="1",
                RAY_TMPDIR=str(root / "ray"), TOKENIZERS_PARALLELISM="false")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-k", default="", help="only cases whose family or name has this substring")
    parser.add_argument("-j", type=int, default=2, help="cases at a time")
    args = parser.parse_args()
    chosen = [c for c in CASES if args.k in f"{c.family} {c.name}"]
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    env = case_env(root)
    started = time.monotonic()
    try:
        S3.start(root / "moto.log")
        with ThreadPoolExecutor(max_workers=args.j) as pool:
            results = list(pool.map(lambda c: run_case(c, root, env), chosen))
    finally:
        S3.stop()
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.case.family:8} {r.case.name} ({r.seconds:.1f} s)"
              + ("" if r.passed else f"\n      {r.why}\n      " + r.message.replace("\n", "\n      ")))
    passed = sum(r.passed for r in results)
    print(f"{passed} passed, {len(results) - passed} failed in {time.monotonic() - started:.0f} s")
    if not args.k:
        write(results)
    shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if passed == len(results) else 1)


def write(results: list[Result]) -> None:
    passed = sum(r.passed for r in results)
    lines = [f"# bad_inputs ({datetime.datetime.now().isoformat(timespec='seconds')})", "",
             f"{passed} passed, {len(results) - passed} failed, of {len(results)} cases "
             "(`.venv/bin/python bench/bad_inputs.py`).", "",
             "| family | case | result | what ftdist said |", "|---|---|---|---|"]
    for r in results:
        said = r.message.replace("|", "\\|").replace("\n", " / ")
        lines.append(f"| {r.case.family} | {r.case.name} | {'pass' if r.passed else 'FAIL: ' + r.why} | {said} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bad_inputs.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
