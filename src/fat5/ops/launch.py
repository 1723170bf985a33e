"""Low-overhead launches of Triton kernels (CUDA).

On every call, ``kernel[grid](*args)`` makes Triton build the autotuner's key and a dict of all arguments,
run the heuristics over another such dict, specialise every argument, turn the specialisation into the compiled
kernel's cache key, evaluate the grid, build launch metadata for the (empty) launch hooks and call them. With
the 40-80 arguments of the attention kernels that is tens of microseconds of Python per launch, more than a
short kernel takes on the GPU.

``Launcher`` memoises what those layers decide. Its key is what decides it: the specialisation of each
positional argument as Triton's own native function computes it (dtype and 16-byte alignment of a tensor;
width, divisibility by 16 and equality to 1 of an int), the raw values of the autotuner's key arguments,
the keyword arguments, the device, and an optional ``extra`` callable for globals that heuristics read. On a
miss the call goes through Triton unchanged, and the compiled kernel it returns is remembered with its
meta-parameters (the autotuner's chosen config, the heuristics' values). On a hit that same compiled kernel is
launched directly with the same arguments. Results are bitwise those of the ordinary path
(tests/ops/test_launch.py on the GPU).

The ordinary path is used, always, without CUDA, when Triton runs in its interpreter (TRITON_INTERPRET=1), when
``FAT5_FAST_LAUNCH=0`` is set (or ``launch.ENABLED`` is set False), and while a launch hook is installed
(profilers that read launch metadata).
Limits: positional arguments must be the kernel's runtime parameters, in order, and keyword arguments its
constexprs; a kernel called otherwise always takes the ordinary path. A heuristic may read only keyword
arguments, the autotuner's config and what ``extra`` returns. An autotuner's config list may be replaced by
another list (the memo is then cleared) but not edited in place; that, or a change of Triton's debug and
instrumentation knobs after launches, needs ``clear()``.
"""

from __future__ import annotations

import functools
import os

import torch
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.runtime.autotuner import Autotuner, Heuristics

ENABLED = (
    os.environ.get("FAT5_FAST_LAUNCH", "1") != "0"
    and os.environ.get("TRITON_INTERPRET") != "1"
    and torch.cuda.is_available()
)


class Launcher:
    """``Launcher(kernel)[grid](*args, **constexprs)``: the same launch as ``kernel[grid](...)``, memoised.

    ``kernel``: a ``triton.jit`` function, optionally under ``triton.heuristics`` and then ``triton.autotune``.
    ``extra``: a callable whose value joins the key (a global that a heuristic reads)."""

    def __init__(self, kernel, extra=None):
        self.kernel = kernel
        self.extra = extra
        self.tuner = kernel if isinstance(kernel, Autotuner) else None
        inner = kernel.fn if self.tuner is not None else kernel
        self.heuristics = inner if isinstance(inner, Heuristics) else None
        self.jit = inner.fn if self.heuristics is not None else inner
        self.names = list(getattr(self.jit, "arg_names", ()))
        keys = self.tuner.keys if self.tuner is not None else ()
        self.key_positions = tuple(self.names.index(k) for k in keys)
        self.configs = self.tuner.configs if self.tuner is not None else None
        self.entries: dict = {}
        self.backends: dict = {}
        self.fast = True  # False once a call showed a layout this class does not reproduce

    def __getitem__(self, grid):
        return functools.partial(self.run, grid)

    def clear(self) -> None:
        self.entries.clear()

    def _key(self, device, args, kwargs):
        backend = self.backends[device]
        spec = tuple([native_specialize_impl(backend, a, False, True, True) for a in args])
        tuned = tuple([args[i] for i in self.key_positions if i < len(args)])
        extra = self.extra() if self.extra is not None else None
        return (device, spec, tuned, tuple(kwargs.items()), extra)

    def run(self, grid, *args, **kwargs):
        if (
            not (ENABLED and self.fast)
            or knobs.runtime.launch_enter_hook.calls
            or knobs.runtime.launch_exit_hook.calls
        ):
            return self.kernel[grid](*args, **kwargs)
        if self.tuner is not None and self.tuner.configs is not self.configs:
            # a config list swapped for another (tests, sweeps): forget what the old one chose
            self.entries.clear()
            self.configs = self.tuner.configs
        device = torch.cuda.current_device()
        hit = self.entries.get(self._key(device, args, kwargs)) if device in self.backends else None
        if hit is None:
            return self._miss(device, grid, args, kwargs)
        compiled, meta, tail = hit
        g = grid(meta) if callable(grid) else grid
        compiled.run(
            g[0],
            g[1] if len(g) > 1 else 1,
            g[2] if len(g) > 2 else 1,
            _raw_stream(device),
            compiled.function,
            compiled.packed_metadata,
            None,
            None,
            None,
            *args,
            *tail,
        )
        return compiled

    def _miss(self, device, grid, args, kwargs):
        compiled = self.kernel[grid](*args, **kwargs)
        if hasattr(compiled, "result"):  # an asynchronous compile
            compiled = compiled.result()
        params = self.jit.params
        if (
            compiled is None
            or any(p.is_constexpr for p in params[: len(args)])
            or not all(p.is_constexpr for p in params[len(args) :])
        ):
            self.fast = False  # called with a layout this class does not reproduce: stay on Triton's path
            return compiled
        self.backends[device] = self.jit.device_caches[device][3]
        meta = dict(kwargs)
        if self.tuner is not None:
            meta.update(self.tuner.best_config.kwargs)
        if self.heuristics is not None:
            named = dict(zip(self.names, args))
            for name, fn in self.heuristics.values.items():
                meta[name] = fn({**named, **meta})
        # the compiled launcher skips constexpr positions: their values are in the binary
        tail = (None,) * (len(params) - len(args))
        self.entries[self._key(device, args, kwargs)] = (compiled, meta, tail)
        return compiled


@functools.cache
def pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch as programmatic dependents (PDL, Hopper and newer): a kernel launched
    so may start while the previous kernel of its stream finishes, and must first wait (``gdc_wait``) before
    touching memory. Off under the interpreter, on older GPUs, and with ``FAT5_PDL=0``."""
    return (
        device.type == "cuda"
        and os.environ.get("TRITON_INTERPRET") != "1"
        and os.environ.get("FAT5_PDL", "1") != "0"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code: that one is a constexpr function, about 10 us a call on a slow host."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host code (0 for 0, as that one)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _raw_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)
