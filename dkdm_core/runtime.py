"""Where and how a job's networks run: device, numeric precision and compilation.

A spec says what it wants (``auto`` by default); :func:`resolve_runtime` turns that into concrete
settings for the device in use, once, and every part of the job (teacher, student, pool, sampling)
then follows the resolved :class:`Runtime`. Defaults:

* **device** ``auto``: the first CUDA device when there is one, else the CPU.
* **precision** ``auto``: ``fp32`` on the CPU (bit-exact results, the equivalence and resume tests
  rely on them); ``bf16`` on a CUDA device that supports it, else ``tf32``. ``bf16`` means autocast
  for the student (fp32 master weights and optimiser state, so small updates are not rounded away)
  and a frozen teacher *held* in bf16: it never trains, so its weights lose nothing that matters and
  its forward pass moves half the bytes.
* **compile** ``auto``: off on the CPU (compilation costs more than a short CPU run gains); on a CUDA
  device ``cudagraphs``: ``torch.compile`` with CUDA graphs, since the shapes of a distillation step
  are static (b samples of one shape) and a small model's step is otherwise bound by kernel launches.
  ``step`` goes further on the local engine: the networks compiled, and the *whole* step (lease,
  teacher, pool return, loss, backward, optimiser, EMA) recorded once as one CUDA graph and replayed
  (``dkdm_core.training.StepGraph``); elsewhere it is ``default``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "tf32", "bf16"]
Compile = Literal["off", "default", "cudagraphs", "step"]
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(name: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else is an error naming the choices."""
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return name


def pick_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``; a CUDA device that is not there is a clear error."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but this machine has no CUDA device")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


@dataclass(frozen=True)
class Runtime:
    """Resolved settings: a concrete device, precision and compile mode."""

    device: torch.device
    precision: Precision
    compile: Compile

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def graph_step(self) -> bool:
        """Record whole training steps as CUDA graphs (``compile: step`` on a GPU)."""
        return self.compile == "step" and self.cuda

    def without_step(self) -> Runtime:
        """This runtime where no whole step is recorded (a Ray replica or rank, O2MKD's router, a pool
        on the CPU): ``compile: step`` compiles the networks with CUDA graphs there, the next best."""
        return replace(self, compile="cudagraphs") if self.compile == "step" else self

    def apply_global(self) -> None:
        """Process-wide matmul settings: TF32 tensor cores for fp32 matmuls under tf32 and bf16."""
        if self.cuda:
            fast = self.precision in ("tf32", "bf16")
            torch.backends.cuda.matmul.allow_tf32 = fast
            torch.backends.cudnn.allow_tf32 = fast

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The student's forward pass context: bf16 autocast, or nothing."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def begin_step(self) -> None:
        """Tell CUDA graph trees a new iteration starts, so last step's graph outputs may be reused."""
        if self.compile == "cudagraphs" and self.cuda:
            torch.compiler.cudagraph_mark_step_begin()

    def generator(self, seed: int) -> torch.Generator:
        """A seeded generator on the device: on a GPU noise is drawn there, with no host round trip.

        On the CPU this is the same generator as before, so CPU runs stay bit-exact.
        """
        return torch.Generator(device=self.device).manual_seed(seed)


def resolve_runtime(device: str = "auto", precision: str = "auto", compile: str = "auto") -> Runtime:
    """Concrete settings for ``auto`` fields, given the machine this runs on."""
    dev = pick_device(device)
    cuda = dev.type == "cuda"
    if precision == "auto":
        bf16_ok = cuda and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16_ok else ("tf32" if cuda else "fp32")
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision {precision!r} is not one of auto, fp32, tf32, bf16")
    if compile == "auto":
        compile = "cudagraphs" if cuda else "off"
    if compile not in ("off", "default", "cudagraphs", "step"):
        raise ValueError(f"compile {compile!r} is not one of auto, off, default, cudagraphs, step")
    return Runtime(device=dev, precision=precision, compile=compile)  # type: ignore[arg-type]


def pool_generator(runtime: Runtime, seed: int, pool_bytes: int, share: float = 0.25) -> torch.Generator:
    """The pool's generator, which decides where the pool lives: on the GPU when it takes at most
    ``share`` of the free device memory (no per-step round trip through the host), else on the CPU."""
    if runtime.cuda:
        free, _ = torch.cuda.mem_get_info(runtime.device)
        if pool_bytes <= share * free:
            return runtime.generator(seed)
    return torch.Generator().manual_seed(seed)


class FrozenTeacher(nn.Module):
    """A frozen teacher run in the runtime's precision: (x_t, t) -> fp32 output.

    Under bf16 its weights are held in bf16 and, on a GPU, in channels_last, the memory layout
    tensor-core convolutions prefer; inputs are cast on the way in, outputs back to fp32 so the
    diffusion maths downstream never sees bf16.
    """

    run: Callable[..., torch.Tensor]

    def __init__(self, net: nn.Module, runtime: Runtime) -> None:
        super().__init__()
        self.net = net.to(runtime.device).eval().requires_grad_(False)
        self.dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float32
        self.channels_last = runtime.cuda and runtime.precision == "bf16"
        if self.dtype != torch.float32:
            self.net.to(self.dtype)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # A CUDA graph's outputs live in its memory pool and are overwritten by the next replay:
        # hand out a copy, since a knowledge batch outlives the call.
        self.copy_out = runtime.compile == "cudagraphs" and runtime.cuda
        # Not a registered submodule: the compiled wrapper shares ``net``'s weights.
        self.__dict__["run"] = compiled(self.net, runtime)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x_t.to(self.dtype)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.run(x, t) if labels is None else self.run(x, t, labels)
        if out.dtype != torch.float32:
            return out.float().contiguous()
        return out.clone() if self.copy_out else out.contiguous()


def compiled(module: nn.Module, runtime: Runtime) -> nn.Module:
    """``module`` compiled as the runtime says (the original module when compile is off).

    CUDA graphs replay a recorded step, so they need static shapes: a training step has them (b
    samples of one shape); ``dynamic=False`` makes a new graph for a new shape instead of a slower
    shape-generic kernel.
    """
    if runtime.compile == "off":
        return module
    mode = "reduce-overhead" if runtime.compile == "cudagraphs" and runtime.cuda else "default"
    return torch.compile(module, mode=mode, dynamic=False)  # type: ignore[return-value]


CPU_FP32 = Runtime(device=torch.device("cpu"), precision="fp32", compile="off")
