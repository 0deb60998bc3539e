"""Where and how tensors run: device choice, mixed precision and memory format.

On CPUs with native bf16 (AVX512-BF16 or AMX), bf16 autocast plus channels_last makes ResNet-12
training about 2.7x faster than fp32 on the 2-core development machine; CUDA uses fp16/bf16 AMP.
fp16 trains with loss scaling (`Runtime.grad_scaler`); it also runs on a CPU, slowly, which is how
the tests check it, but `auto` never picks it there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from metatransfer.config import Config
from metatransfer.errors import ConfigError


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the kernel.

    Training frees and re-allocates activation buffers of tens of MB every step; by default glibc
    unmaps each one and the next step faults it back in page by page (at 84 px about 1.5 s of kernel
    time per meta-training task on 2 cores). Returns False where glibc is absent or
    MTL_KEEP_FREED_MEMORY=0; the cost is that the process keeps its peak memory.
    """
    if os.environ.get("MTL_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (otherwise bf16 autocast is slower than fp32)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@dataclass(frozen=True)
class Runtime:
    """The resolved device and numeric settings a training or evaluation loop runs with."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None = full fp32
    channels_last: bool
    compile: bool = False

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Move a [B,C,H,W] batch to the device in the memory format the backbone runs fastest in."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def compiled(self, module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``module``'s forward, through ``torch.compile`` when this runtime compiles (else ``module`` itself).

        The compiled function shares ``module``'s parameters and buffers; see `CompiledForward`.
        """
        return CompiledForward(module) if self.compile else module

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16, whose small gradients would otherwise underflow to zero; disabled (a
        pass-through) for fp32 and bf16, which have fp32's exponent range."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]


class CompiledForward:
    """Calls ``torch.compile(module)``; if compiling fails (no C++ compiler, an unsupported op), warns once
    and calls ``module`` eagerly from then on, so a run never dies of an optional speed-up.

    After the second distinct batch size torch makes the batch dimension dynamic, so further sizes
    (hard-task or last meta-batches) mostly reuse that graph; a batch of one image is compiled apart.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._fn: Callable[[torch.Tensor], torch.Tensor] | None = torch.compile(module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is not None:
            try:
                return self._fn(x)
            except Exception as exc:  # any compiler failure means "run eagerly"
                first_line = next(iter(str(exc).splitlines()), "")
                warnings.warn(
                    f"torch.compile failed ({type(exc).__name__}: {first_line}); "
                    "continuing without it (set compile=false to skip the attempt)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._fn = None
        return self.module(x)


def resolve_runtime(cfg: Config) -> Runtime:
    """Turn `device`, `precision`, `channels_last`, `threads` and `compile` into a Runtime (and apply threads)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError as exc:
            raise ConfigError(
                f"config key 'device' is {cfg.device!r}; use auto, cpu, cuda or cuda:N"
            ) from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "config key 'device' asks for cuda but no CUDA device is available; use device=cpu"
            )
    precision = cfg.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_bf16() else "fp32"
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Runtime(device=device, amp_dtype=amp, channels_last=cfg.channels_last, compile=cfg.compile)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily switch `module` to eval mode, restoring its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
