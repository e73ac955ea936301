"""train.compile: torch.compile of every decoder block and of the chunked loss.

Blocks are compiled one by one, not the model as a whole: all blocks share one code path, so
one compilation serves them all (dynamo treats a module's parameters as inputs), and the
modules, their names, state dict and the hooks around them (DeepSpeed's, PEFT's, gradient
checkpointing's) stay as they are: only each block's forward is replaced. Where it cannot
compile, the run says so once and goes on uncompiled.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ftdist.model.build import ModelBundle, decoder_blocks


def compile_problem(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot run on this machine, or None."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except (RuntimeError, OSError, ImportError):
        return "no C++ compiler found (install g++, or set CXX)"
    return None


class Compiled:
    """Compiled forwards that fall back to eager, all together, at the first compile failure."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.failed = False

    def wrap(self, eager: Callable, **compile_kwargs) -> Callable:
        compiled = torch.compile(eager, **compile_kwargs)

        def forward(*args, **kwargs):
            if self.failed:
                return eager(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:
                # A failure comes from compiling, before (or between) graphs that only compute:
                # running the call again eagerly is safe.
                self.failed = True
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self.say(f"train.compile: torch.compile failed ({first_line[:200]}); training uncompiled")
                return eager(*args, **kwargs)

        return forward


def compile_model(bundle: ModelBundle, device: torch.device, say: Callable[[str], None]) -> bool:
    """Compile the bundle's blocks (and chunked loss) in place. False when it cannot compile."""
    problem = compile_problem(device)
    if problem:
        say(f"train.compile: cannot compile here: {problem}; training uncompiled")
        return False
    compiled = Compiled(say)
    block: nn.Module
    for block in decoder_blocks(bundle.model)[1]:
        block.forward = compiled.wrap(block.forward)  # an instance attribute: the module stays
    if bundle.head is not None:
        # The last chunk is shorter than the others: dynamic shapes, one compilation.
        bundle.head.chunk_loss = compiled.wrap(bundle.head.chunk_loss, dynamic=True)
    return True
