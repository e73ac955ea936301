"""What a person sees while training runs: the progress lines, perplexity."""

from __future__ import annotations

import sys


class Progress:
    """A progress bar on a terminal; plain log lines (every log_every steps) otherwise."""

    def __init__(self, total: int, start: int, log_every: int, enabled: bool = True,
                 stream=None, told: tuple[str, ...] = ()):
        """`told`: the objective's metrics a step's line tells where the step has them."""
        self.total, self.log_every, self.enabled, self.told = total, log_every, enabled, told
        self.stream = stream or sys.stdout
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=self.stream)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}")
            return
        step = record["step"]
        if step % self.log_every == 0 or step == self.total:
            extra = "".join(f"  {key.replace('_', ' ')} {record[key]:.4f}"
                            for key in ("replay_loss", "penalty", *self.told) if key in record)
            self.write(
                f"step {step}/{self.total}  loss {record['loss']:.4f}{extra}  lr {record['lr']:.2e}  "
                f"grad_norm {record['grad_norm']:.3f}  tokens/s {record['tokens_per_s']:.0f}"
            )

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


