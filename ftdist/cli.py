"""ftdist train | tune | prepare | plan | generate | report | export.

Exit codes: 0 success; 2 a user error (config, data, paths), told in one message
without a traceback; 1 an internal failure; 130 interrupted (rerun to resume); 143 stopped
on SIGTERM at a step boundary with a checkpoint (rerun to resume, no step lost).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from ftdist.artifacts.report import format_summary, report
from ftdist.config.load import load_config, load_raw, validate_config
from ftdist.config.redact import redact_url
from ftdist.config.schema import StorageConfig
from ftdist.data.chat_templates import rendering
from ftdist.engines.registry import resolve, unused_libraries
from ftdist.errors import EXIT_USER_ERROR, UserError, path_problem
from ftdist.io.layout import FINAL_DIR, FINISHED, RUN_MARKER
from ftdist.io.quiet import quiet_libraries, without_libraries
from ftdist.launch.local import train_local
from ftdist.launch.prepare import prepare
from ftdist.launch.ray_train import train_ray
from ftdist.objectives.registry import objective_class
from ftdist.training.notice import EXIT_STOPPED, StopNotice, StoppedOnNotice, stop_on_sigterm
from ftdist.tune.experiment import tune

EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, its errors told as every other user error: one `ftdist: error:` line (the
    command, the flag and what it takes), exit 2; the usage stays with --help."""

    def error(self, message: str):
        command = self.prog.removeprefix("ftdist").strip()
        where = f"ftdist {command} --help" if command else "ftdist --help"
        self.exit(EXIT_USER_ERROR, f"ftdist: error: {command + ': ' if command else ''}{message} (see {where})\n")


# Flag types: a value no command can use is refused as the flag it was given to, by argparse
# ("argument --gpu-memory: ..."), before anything loads.


def at_least(kind: type, minimum: float, strict: bool = False):
    """An argparse type: a number of `kind` at least `minimum` (above it with `strict`); nan and
    inf are refused by _number."""
    what = "a whole number" if kind is int else "a number"
    told = f"a number above {minimum:g}" if strict else f"{minimum:g} or more"

    def parse(text: str):
        value = _number(text, kind, what)
        if not (value > minimum if strict else value >= minimum):
            raise argparse.ArgumentTypeError(f"must be {told} (got {text})")
        return value
    return parse


positive_int = at_least(int, 1)
non_negative_int = at_least(int, 0)
positive_float = at_least(float, 0, strict=True)
non_negative_float = at_least(float, 0)


SEED_MAX = 2**32 - 1  # numpy's seeds, as train.seed's (ftdist.config.schema.SEED_MAX; not imported: pydantic)


def seed_value(text: str) -> int:
    value = _number(text, int, "a whole number")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be from 0 to {SEED_MAX} (got {text})")
    return value


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what} (got {text!r})") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def text_value(text: str) -> str:
    """A prompt or a text to label: some text, in Unicode (a shell can pass bytes that are not
    UTF-8, which arrive as lone surrogates)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give the text itself")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 text (got {text!r})") from None
    return text


def run_command_parser(sub, name: str, help: str, description: str, config_help: str, example: str,
                       restart_help: str) -> argparse.ArgumentParser:
    """`train` and `tune`: a config, the Ray cluster to join, overrides, --restart."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.add_argument("config", help=config_help)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, the cluster a `ray job submit` job runs "
                             "in, or a Ray started on this machine; else a new local one)")
    add_overrides(parser, example)
    parser.add_argument("--restart", action="store_true", help=restart_help)
    return parser


def add_overrides(command: argparse.ArgumentParser, example: str) -> None:
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help=f"override a config key, e.g. --set {example} (repeatable)")


def add_trust_remote_code(command: argparse.ArgumentParser) -> None:
    command.add_argument("--trust-remote-code", action="store_true",
                         help="let a model or tokenizer that ships code of its own (auto_map) run it; off: refused "
                              "(model.trust_remote_code in a config; the run's own snapshot is not asked)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ftdist", description="Fine-tune causal language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,tune,prepare,plan,generate,classify,report,export}")

    train = run_command_parser(sub, "train", "fine-tune a model from a YAML config",
                               "Fine-tune a model. The same command again resumes from the newest complete checkpoint.",
                               "YAML config (docs/configuration.md)", "train.lr=3e-4",
                               "delete this run's directory and start over instead of resuming")
    train.add_argument("--local", action="store_true",
                       help="run in this process, on this machine's CPU (or its GPU if it has one), without "
                            "Ray (also what distributed.workers: 0 means)")
    run_command_parser(sub, "tune", "search hyperparameters (the config's tune: section) with Ray Tune",
                       "Run the trials of the config's tune: section, each a Ray Train run, with early stopping; "
                       "write the results table, best.yaml and plots into <run.output>/<tune.name>. The same "
                       "command again continues an interrupted search without rerunning finished trials.",
                       "YAML config with a tune: section (docs/tuning.md)", "tune.num_samples=16",
                       "delete the experiment's directory and search again from scratch")

    pre = sub.add_parser("prepare", help="tokenize and pack a config's data into the prepared-data cache",
                         description="Validate, tokenize and pack the config's data into storage.cache_dir "
                                     "(keyed by the files' content and the settings that shape the rows), so "
                                     "that its runs, and every trial of a search, start from the packed rows. "
                                     "Prints rows, tokens and the packing efficiency.")
    pre.add_argument("config", help="YAML config")
    add_overrides(pre, "data.max_length=1024")

    pla = sub.add_parser("plan", help="will a config fit its GPUs? the plan and memory estimate, before renting them",
                         description="Print the plan and the per-device memory estimate of a config on GPUs of a "
                                     "given size, from the model's config.json alone (no cluster, no weights). "
                                     "Exit 0 when it fits, 2 when it does not (with what would make it fit).")
    pla.add_argument("config", help="YAML config")
    pla.add_argument("--workers", type=non_negative_int, default=None,
                     help="number of GPU workers (default: distributed.workers)")
    pla.add_argument("--gpu-memory", type=positive_float, default=None, metavar="GiB",
                     help="memory of each GPU in GiB (default: 79.1, an 80 GB H100 or A100)")
    add_overrides(pla, "train.gradient_checkpointing=true")

    gen = sub.add_parser("generate", help="generate text with a trained model",
                         description="Generate with a model or adapter directory, e.g. runs/NAME/final.")
    gen.add_argument("model", help="a model or adapter directory (e.g. runs/NAME/final)")
    gen.add_argument("--prompt", action="append", required=True, type=text_value, help="prompt text (repeatable)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32)
    gen.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--seed", type=seed_value, default=0, help=f"0 to {SEED_MAX} (sampling with --temperature)")
    add_trust_remote_code(gen)
    gen.add_argument("--chat", action="store_true",
                     help="send each prompt as a user message through the tokenizer's chat template")

    cls = sub.add_parser("classify", help="label texts with a trained classifier (task: classification)",
                         description="Print each text's most likely label and every label's probability, with "
                                     "a classification run's final model or adapters (runs/NAME/final).")
    cls.add_argument("model", help="a classification run's final/ directory")
    cls.add_argument("--text", action="append", required=True, type=text_value, help="a text to label (repeatable)")
    add_trust_remote_code(cls)

    rep = sub.add_parser("report", help="plots and a summary of a run",
                         description="Write loss.png, lr.png, throughput.png and report.json into the run "
                                     "directory and print a summary.")
    rep.add_argument("run_dir", help="a run directory (<run.output>/<run.name>)")

    exp = sub.add_parser("export", help="write a trained model or adapter directory to use without ftdist",
                         description="Export a run's final model (or, before it finishes, its newest complete "
                                     "checkpoint), or one checkpoint: a Hugging Face model directory for method "
                                     "full, a PEFT adapter directory for lora/qlora, each with its tokenizer.")
    exp.add_argument("source", help="a run directory (<run.output>/<run.name>) or a checkpoint "
                                    "(<run>/checkpoints/step-N)")
    exp.add_argument("--out", required=True, help="the directory to write (new or empty)")
    exp.add_argument("--merge", action="store_true",
                     help="lora/qlora: write one standalone model, the adapters merged into the base (for qlora "
                          "the 4-bit base dequantized, the weights the adapters were trained against)")
    exp.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    add_trust_remote_code(exp)
    exp.add_argument("--endpoint-url", default=None,
                     help="s3:// sources on an S3-compatible store: its endpoint (as storage.endpoint_url)")
    exp.add_argument("--region", default=None, help="s3:// sources: the bucket's region (as storage.region)")
    return parser


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.local or cfg.distributed.workers == 0:
        if args.address:
            why = "--local" if args.local else "distributed.workers: 0"
            raise UserError(f"--address {args.address} joins a Ray cluster, but {why} runs in this process; "
                            "drop one of the two")

        without_libraries(unused_libraries(resolve(cfg.distributed.engine, local=True)))
        with stop_on_sigterm(StopNotice()) as notice:
            summary = train_local(cfg, restart=args.restart, notice=notice)
    else:
        summary = train_ray(cfg, restart=args.restart, address=args.address, notice=StopNotice())

    objective = objective_class(cfg)
    print(f"done: model in {summary['final_dir']}")
    # The objective's told metrics, as the summary names them.
    for key in ("eval_loss", *(f"eval_{name}" for name in objective.told), "forgetting"):
        if summary.get(key) is not None:
            print(f"  {key}: {summary[key]:.4f}")
    worse = summary.get("negative_transfer")
    if worse:
        told = [f"the task's {metric.replace('_', ' ')} {'rose' if objective.metrics[metric] == 'min' else 'fell'} from "
                f"{worse[f'{metric}_start']:.4f} before training to {worse[f'{metric}_end']:.4f} at the end"
                for metric in objective.transfer if f"{metric}_start" in worse]
        print(f"  negative transfer: {' and '.join(told)}; the fine-tune made the task worse than the base model: "
              "lower train.lr, freeze more layers (freeze_layers), or check the training data against the eval data")
    print(f"  metrics: {summary['run_dir']}/metrics.jsonl, plot: {summary['run_dir']}/loss.png")
    return 0


def cmd_tune(args) -> int:
    raw = load_raw(args.config, args.overrides)  # trials and best.yaml start from the config as written
    experiment, results = tune(validate_config(raw, source=args.config), raw, restart=args.restart,
                               address=args.address)
    try:  # the search's directory is this command's until its report is written
        return report_search(experiment, results)
    finally:
        experiment.done()


def report_search(experiment, results) -> int:
    from ftdist.tune.results import collect, end_search_tracking, format_table, write_report

    rows = collect(experiment, results)
    print(format_table(experiment.cfg, rows))
    for row in rows:
        if row.error:
            print(f"  {row.trial} failed: {row.error}")
    summary = write_report(experiment, rows)
    store = experiment.store
    unfinished = [r.trial for r in rows if r.status == "not finished"]
    end_search_tracking(experiment, rows, summary, interrupted=bool(unfinished))
    print(f"results: {store.path('results.csv')}; plots: {store.path('eval_curves.png')}, "
          f"{store.path('metric_vs_params.png')}")
    if unfinished:
        print(f"ftdist: interrupted with {len(unfinished)} trial(s) not finished; run the same command again to "
              "continue (finished trials are kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    best = summary["best"]
    if best is None:
        raise UserError(f"no trial of {store.url} finished; see the table above and the trials' logs")
    print(f"best: {best['trial']} ({experiment.cfg.tune.metric} {best['metric']:.4f}): "
          + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    print(f"  config: {best['config']} (run it with `ftdist train`)\n  model: {best['final_model']}")
    return 0


def cmd_prepare(args) -> int:
    without_libraries(unused_libraries("plain"))  # preparing data steps no engine
    print("\n".join(prepare(load_config(args.config, args.overrides))))
    return 0


def cmd_plan(args) -> int:
    from ftdist.launch.fit import DEFAULT_GPU_GIB, size_up

    overrides = args.overrides + ([f"distributed.workers={args.workers}"] if args.workers is not None else [])
    sizing = size_up(load_config(args.config, overrides),
                     DEFAULT_GPU_GIB if args.gpu_memory is None else args.gpu_memory)
    print("\n".join(sizing.lines))
    return 0 if sizing.fits else EXIT_USER_ERROR


def cmd_generate(args) -> int:
    from ftdist.artifacts.generate import generate, load_trained
    from ftdist.model.build import default_device

    args.model = model_directory(args.model)
    device = default_device()
    model, tokenizer = load_trained(args.model, device, trust_remote_code=args.trust_remote_code)
    for prompt in args.prompt:
        text = prompt
        if args.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise UserError(f"{args.model}: the tokenizer has no chat template; drop --chat")
            with rendering(f"{args.model}: the chat template of its tokenizer",
                           "fix chat_template in its tokenizer_config.json (or chat_template.jinja), or drop --chat"):
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
        answer = generate(model, tokenizer, text, args.max_new_tokens, args.temperature, args.seed, device)
        print(f"{prompt} -> {answer.strip()}" if args.chat else f"{prompt}{answer}")
    return 0


def model_directory(given: str) -> str:
    """The model directory `generate` / `classify` load: `given`, or a run directory's final/
    (said on stderr); a run that has not finished is told where its model will be."""
    path = Path(given)
    if not path.is_dir():
        raise UserError(f"{given}: no such directory (give e.g. runs/NAME/final)")
    is_model = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    if is_model or not (path / RUN_MARKER).is_file():
        return given
    if (path / FINISHED).is_file():
        print(f"ftdist: {given} is a run directory: using its model, {path / FINAL_DIR}", file=sys.stderr, flush=True)
        return str(path / FINAL_DIR)
    raise UserError(f"{given} is a run directory that has not finished: its model will be {path / FINAL_DIR}, which "
                    f"is not there yet; run its training to the end (the same ftdist train command resumes it), or "
                    f"write its newest checkpoint as a model with `ftdist export {given} --out DIR` and use DIR")


def cmd_classify(args) -> int:
    from ftdist.artifacts.classify import load_classifier, predict

    args.model = model_directory(args.model)
    model, tokenizer, pooling = load_classifier(Path(args.model), trust_remote_code=args.trust_remote_code)
    for text, probs in zip(args.text, predict(model, tokenizer, args.text, pooling)):
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])
        print(f"{ranked[0][0]} ({', '.join(f'{label} {p:.3f}' for label, p in ranked)}): {text}")
    return 0


def cmd_report(args) -> int:
    summary, plots = report(Path(args.run_dir))
    print(format_summary(summary))
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0


def cmd_export(args) -> int:
    from ftdist.artifacts.export import export

    storage = StorageConfig(endpoint_url=args.endpoint_url, region=args.region)
    print(export(args.source, args.out, merge=args.merge, force=args.force, storage=storage,
                 trust_remote_code=args.trust_remote_code))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(signal, "SIGXFSZ"):  # under a file-size limit a write fails (and is told), not the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    joined_before = ray_joined()  # a caller's own Ray (a test, a notebook) is left to it
    code = run_command(args, leave=not joined_before)
    if not joined_before:
        leave_ray(code)
    return code


def ray_joined() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def run_command(args, leave: bool) -> int:
    try:
        quiet_libraries()
        return {"train": cmd_train, "tune": cmd_tune, "prepare": cmd_prepare, "plan": cmd_plan, "generate": cmd_generate,
                "classify": cmd_classify, "report": cmd_report, "export": cmd_export}[args.command](args)
    except UserError as e:
        # Every URL's credentials (userinfo, query values) redacted, whichever check wrote the message.
        print(f"ftdist: error: {redact_url(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ftdist: interrupted; run the same command again to resume from the newest checkpoint",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except StoppedOnNotice as e:
        print(f"ftdist: stopped on {e}", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as e:  # noqa: BLE001 - only what path_problem tells is translated
        # Wherever it came from, an OSError the user can fix (a permission, a full disk, a name too
        # long) is one message, naming the place and the fix; any other is ftdist's own failure.
        told = path_problem(e)
        if told is None:
            if leave:
                leave_ray(1)
            raise
        print(f"ftdist: error: {told}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BaseException:
        if leave:
            leave_ray(1)
        raise


# How long leaving Ray may take before the process exits without it (a head that stopped answering).
LEAVE_RAY_TIMEOUT_S = 30.0


def leave_ray(code: int) -> None:
    """Disconnect from the Ray this command joined (stopping the one it started) before the
    interpreter exits: left to interpreter shutdown, Ray's core worker can abort the process
    ("terminate called ...", exit 134) after the command has already succeeded. Bounded: when
    Ray does not let go in time, the streams are flushed and the process exits with its code.
    What Ray's native code writes while it tears down (gRPC's and abseil's "RAW: Lock ..." lines,
    seen under load) is not the user's: stdout and stderr point at /dev/null meanwhile."""
    import threading

    if not ray_joined():
        return
    ray = sys.modules["ray"]
    done = threading.Event()

    def shutdown() -> None:
        try:
            ray.shutdown()
        finally:
            done.set()

    restore = drop_native_output()
    threading.Thread(target=shutdown, daemon=True, name="ftdist-leave-ray").start()
    left = done.wait(LEAVE_RAY_TIMEOUT_S)
    restore()
    if not left:
        print(f"ftdist: Ray did not shut down within {LEAVE_RAY_TIMEOUT_S:.0f} s; exiting without it", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def drop_native_output() -> Callable[[], None]:
    """File descriptors 1 and 2 pointed at /dev/null (Python's streams flushed first); returns
    the function that puts them back."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    sink = os.open(os.devnull, os.O_WRONLY)
    for fd in saved:
        os.dup2(sink, fd)
    os.close(sink)

    def restore() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)

    return restore


def run() -> int:
    """The `ftdist` command (and `python -m ftdist`): main, then, where this process ran Ray, its
    native teardown at interpreter exit kept out of what the user reads (everything ftdist had to
    say is printed by then)."""
    code = main()
    if "ray" in sys.modules:
        drop_native_output()
    return code
