"""Launch configurations chosen once per shape class and cached; never tuned inside capture or tracing.

Every Triton kernel of the library is launched through a `TunedKernel`: on the first launch of a shape
class (bucketed sizes, dtype, flags; see `shape_class`) it times each candidate config and keeps the
fastest; later launches of that class reuse it. While a CUDA graph is being captured or torch.compile /
torch.export is tracing, an untuned class gets the kernel's default config instead of being timed (timing
would launch and synchronise inside the capture), and that choice is not cached. `stss_kernels.warmup`
tunes the classes of given shapes ahead of time.

With STSS_TUNING_FILE=PATH set, choices outlive the process: a class met for the first time is looked up in
that JSON file (under this GPU's name and architecture) before anything is timed, and each new choice is
added to it, so a series of processes (the GPU suite's steps) tunes every class once. A stored config is
used only while it is still one of the kernel's candidates; it also serves inside capture and tracing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import torch

from stss_kernels._core.backends import triton_interpreting
from stss_kernels._core.library import is_tracing

# Set STSS_AUTOTUNE=0 to use every kernel's default config without timing anything.
AUTOTUNE_ENV = "STSS_AUTOTUNE"
# Set STSS_TUNING_FILE=PATH to read and add to a JSON file of tuned configs shared by processes.
TUNING_FILE_ENV = "STSS_TUNING_FILE"


def next_power_of_two(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def shape_class(*, tokens: int, hw: int, channels: Sequence[int], dtype: torch.dtype, **flags) -> tuple:
    """The key configs are cached under: N and channel counts rounded up to powers of two, HW exact (the key
    padding of a frame depends on it), the dtype and the kernel's flags (masked, pass, side...)."""
    return (
        next_power_of_two(tokens),
        int(hw),
        tuple(next_power_of_two(c) for c in channels),
        str(dtype).removeprefix("torch."),
        tuple(sorted(flags.items())),
    )


def capturing_or_tracing() -> bool:
    """True inside CUDA-graph capture or torch.compile / torch.export tracing: no timing runs then."""
    if is_tracing():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def hopper_only(config):
    """Mark a config as meant for sm_90 only (it spills registers with sm_80's mma.sync): `archs` lists where it runs.

    TunedKernel skips it on other GPUs; the AOT report can skip it on other targets."""
    config.archs = ("sm_90a",)
    return config


def hopper_only_configs(configs: list, indices) -> list:
    """Mark configs[i] for i in indices hopper_only (a no-op on the interpreter's one-config list)."""
    if len(configs) > 1:
        for index in indices:
            hopper_only(configs[index])
    return configs


def runs_here(config) -> bool:
    """Whether the current GPU is one of the config's `archs` (every config without that attribute runs)."""
    archs = getattr(config, "archs", None)
    if archs is None or not torch.cuda.is_available():
        return True
    major, minor = torch.cuda.get_device_capability()
    return any(arch.removeprefix("sm_").rstrip("a") == f"{major}{minor}" for arch in archs)


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").lower() not in ("0", "false", "no", "off")


def config_record(config) -> dict:
    """What identifies a config among a kernel's candidates: what a launch passes (see TunedKernel.__call__)."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def device_label() -> str:
    """The GPU that tuned configs belong to, e.g. 'NVIDIA H100 80GB HBM3 sm_90'."""
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} sm_{major}{minor}"


def read_tuning_file(path: str) -> dict:
    """{"devices": {device label: {kernel name: {repr(shape class): config record}}}}; {} where there is no file."""
    try:
        with open(path) as file:
            data = json.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{TUNING_FILE_ENV}={path}: not a readable tuning file ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("devices", {}), dict):
        raise ValueError(f"{TUNING_FILE_ENV}={path}: not a tuning file (expected {{'devices': {{...}}}})")
    return data


def stored_config(name: str, key: tuple, configs: Sequence):
    """The config of `configs` that the tuning file holds for kernel `name` and shape class `key`, else None."""
    path = os.environ.get(TUNING_FILE_ENV)
    if not path or not torch.cuda.is_available():
        return None
    record = read_tuning_file(path).get("devices", {}).get(device_label(), {}).get(name, {}).get(repr(key))
    return next((config for config in configs if config_record(config) == record), None)


def store_config(name: str, key: tuple, config) -> None:
    """Add a choice to the tuning file: read it again, merge, and replace it in one step (a reader never sees half a
    file; two processes storing at the same moment can drop one choice, which is then tuned again later)."""
    path = os.environ.get(TUNING_FILE_ENV)
    if not path or not torch.cuda.is_available():
        return
    data = read_tuning_file(path)
    kernels = data.setdefault("devices", {}).setdefault(device_label(), {})
    kernels.setdefault(name, {})[repr(key)] = config_record(config)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        json.dump(data, file, indent=1, sort_keys=True)
    os.replace(temporary, path)


@dataclasses.dataclass
class TunedKernel:
    """A @triton.jit kernel with candidate configs, launched with the cached config of each shape class.

    kernel: the JITFunction; configs: triton.Config list (the GPU list, or the interpreter's one);
    default(key) -> index into configs used when tuning is not allowed (capture, tracing, STSS_AUTOTUNE=0);
    configs marked `hopper_only` are not timed on other GPUs;
    restore: names of launch arguments the kernel reads and writes, saved and restored around timing runs.
    """

    name: str
    kernel: object
    configs: list
    default: Callable[[tuple], int] = lambda key: 0
    restore: tuple[str, ...] = ()
    cache: dict = dataclasses.field(default_factory=dict)

    def config_for(self, key: tuple, launch: Callable[[object], None], arguments: dict):
        """The cached config of `key`, tuned now (timing `launch(config)` for each) when allowed."""
        if key in self.cache:
            return self.cache[key]
        if len(self.configs) == 1 or triton_interpreting():
            self.cache[key] = self.configs[0]
            return self.configs[0]
        stored = stored_config(self.name, key, self.configs)
        if stored is not None:
            self.cache[key] = stored
            return stored
        if capturing_or_tracing() or not autotune_enabled():
            return self.configs[self.default(key)]
        self.cache[key] = self._tune(launch, arguments)
        store_config(self.name, key, self.cache[key])
        return self.cache[key]

    def _tune(self, launch: Callable[[object], None], arguments: dict):
        from triton.testing import do_bench

        saved = {name: arguments[name].clone() for name in self.restore}
        timings = []
        for config in self.configs:
            if not runs_here(config):
                timings.append(float("inf"))
                continue
            try:
                time_ms = do_bench(lambda config=config: launch(config), warmup=5, rep=20)
            except Exception as error:  # noqa: BLE001 - a config that does not fit this GPU (shared memory...) is skipped
                if "out of resource" not in str(error).lower() and "OutOfResources" not in type(error).__name__:
                    raise
                time_ms = float("inf")
            timings.append(time_ms)
            for name, value in saved.items():
                arguments[name].copy_(value)
        best = min(range(len(timings)), key=timings.__getitem__)
        if timings[best] == float("inf"):
            raise RuntimeError(f"{self.name}: no launch configuration fits this GPU")
        if os.environ.get("STSS_PRINT_AUTOTUNING") == "1":
            print(f"stss_kernels: {self.name} -> {self.configs[best]} ({timings[best]:.3f} ms)")
        return self.configs[best]

    def __call__(self, grid: Callable[[dict], tuple], key: tuple, arguments: dict, constants: dict) -> None:
        """Launch over grid(config.kwargs) with the tensors / scalars `arguments` and constexprs `constants`."""

        def launch(config) -> None:
            self.kernel[grid(config.kwargs)](
                **arguments, **constants, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
            )

        launch(self.config_for(key, launch, arguments))


REGISTRY: dict[str, TunedKernel] = {}


def tuned_kernel(name: str, kernel, configs, default=lambda key: 0, restore: tuple[str, ...] = ()) -> TunedKernel:
    """Create and register a TunedKernel (so `tuned_configs` and `clear_tuning_cache` see it)."""
    REGISTRY[name] = TunedKernel(name, kernel, list(configs), default, restore)
    return REGISTRY[name]


def tuned_configs() -> dict[str, dict]:
    """{kernel name: {shape class: chosen config}} of everything tuned so far in this process."""
    return {name: dict(tuned.cache) for name, tuned in REGISTRY.items() if tuned.cache}


def clear_tuning_cache() -> None:
    for tuned in REGISTRY.values():
        tuned.cache.clear()
