"""Pick the compute device once (``cuda`` > ``mps`` > ``cpu``, overridable) and its speed settings."""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["pick_device", "amp_dtype", "needs_grad_scaler", "grad_scaler", "autocast", "full_precision",
           "prepare_model", "describe_device", "cpu_cores", "cpu_threads", "apply_cpu_threads", "THREAD_ROLES",
           "machine_info", "deterministic", "deterministic_requested"]

THREAD_ROLES = ("worker", "ui", "cli")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_threads(role: str, cores: int | None = None, worker_running: bool = False) -> int:
    """The one rule for torch's CPU thread counts, so that processes sharing the cores never ask for more threads
    than there are (oversubscribed, two jobs on two cores ran 6-18x slower than alone, issue 12.4):

    - ``"worker"`` (the background defense worker): all cores but one, left to the dashboard's own computations;
    - ``"ui"`` (the dashboard server): one;
    - ``"cli"``: all cores, or one when a background worker is running (it holds the rest).

    ``BACKDOOR_LENS_THREADS`` (a positive integer) overrides the rule for every role.
    """
    if role not in THREAD_ROLES:
        raise ValueError(f"unknown thread role {role!r}; expected one of {', '.join(THREAD_ROLES)}")
    forced = os.environ.get("BACKDOOR_LENS_THREADS", "").strip()
    if forced:
        try:
            n = int(forced)
        except ValueError:
            raise ValueError(f"BACKDOOR_LENS_THREADS must be a positive integer, got {forced!r}") from None
        if n < 1:
            raise ValueError(f"BACKDOOR_LENS_THREADS must be a positive integer, got {forced!r}")
        return n
    cores = cpu_cores() if cores is None else max(1, int(cores))
    if role == "worker":
        return max(1, cores - 1)
    if role == "ui":
        return 1
    return 1 if worker_running else cores


def apply_cpu_threads(role: str, worker_running: bool = False) -> int:
    """Set torch's intra-op thread count for this process by :func:`cpu_threads`; returns it. Inter-op threads are
    set to match only where torch still allows it (before any parallel work has started)."""
    n = cpu_threads(role, worker_running=worker_running)
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)
    return n


def pick_device(override: str | None = None) -> torch.device:
    """``override`` (or the environment variable ``BACKDOOR_LENS_DEVICE``) wins; else the best available."""
    choice = override or os.environ.get("BACKDOOR_LENS_DEVICE") or None
    if choice and choice != "auto":
        dev = torch.device(choice)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {choice!r} requested but CUDA is not available on this machine")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device {choice!r} requested but MPS is not available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device | str, enabled: bool = True) -> torch.dtype | None:
    """The one choice of mixed precision: bfloat16 on a CUDA device that supports it, float16 on older CUDA
    devices (which then need a gradient scaler, see :func:`needs_grad_scaler`), none on the CPU and MPS."""
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """float16 gradients underflow without loss scaling (Micikevicius et al., ICLR 2018); bfloat16 has float32's
    exponent range and needs none."""
    return dtype == torch.float16


def grad_scaler(device: torch.device | str, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A gradient scaler for float16 autocast on ``device``; None for bfloat16 and full precision."""
    if not needs_grad_scaler(dtype):
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def autocast(device: torch.device | str, enabled: bool = True, dtype: torch.dtype | None = None):
    """Autocast to ``dtype`` (default: :func:`amp_dtype`, i.e. mixed precision on CUDA only); a no-op without one."""
    device = torch.device(device)
    dtype = dtype if dtype is not None else amp_dtype(device, enabled)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: torch.device | str):
    """Switch autocast off inside an autocast region (for losses and small heads that want float32)."""
    device = torch.device(device)
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _cpu_channels_last_unsafe(conv: torch.nn.Module) -> bool:
    """A strided 1x1 convolution with fewer than 16 input channels: its channels-last backward on the CPU
    (torch 2.14.1) corrupts memory for odd batch sizes (3, 5, 7, ...), e.g. the 8 -> 16 shortcut of a width-8
    PreAct-ResNet. Such convolutions run in the standard memory format instead."""
    return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and max(conv.stride) > 1
            and conv.in_channels < 16)


def _standard_format_input(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)


def prepare_model(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move to ``device``; channels-last memory format on CUDA and CPU (faster convolutions on both), except
    for the convolutions that the CPU's channels-last backward gets wrong (see ``_cpu_channels_last_unsafe``)."""
    device = torch.device(device)
    model = model.to(device)
    if device.type in ("cuda", "cpu"):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        for conv in model.modules():
            if _cpu_channels_last_unsafe(conv):
                conv.to(memory_format=torch.contiguous_format)
                if _standard_format_input not in conv._forward_pre_hooks.values():
                    conv.register_forward_pre_hook(_standard_format_input)
    return model


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    x = x.to(device, non_blocking=True)
    if device.type in ("cuda", "cpu") and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def describe_device(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere :func:`platform.processor`)."""
    import platform

    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _build_settings() -> dict[str, str]:
    """``BLAS_INFO`` / ``LAPACK_INFO`` / ``USE_MKLDNN`` ... from :func:`torch.__config__.show`'s build settings."""
    out: dict[str, str] = {}
    with contextlib.suppress(Exception):
        for line in torch.__config__.show().splitlines():
            if "Build settings:" in line:
                for part in line.split("Build settings:", 1)[1].split(","):
                    key, _, value = part.strip().partition("=")
                    if key in ("BLAS_INFO", "LAPACK_INFO", "USE_MKLDNN", "USE_OPENMP"):
                        out[key] = value.strip()
    return out


def machine_info(device: torch.device | str | None = None) -> dict[str, object]:
    """What a run's numbers depend on besides the code and the seed, kept small for every report: the CPU model, the
    kernels torch dispatches to on it (``cpu_capability``: AVX2 / AVX512 ...), torch's version, BLAS and oneDNN,
    its thread counts, whether deterministic algorithms are on, and the GPU with CUDA / cuDNN versions where one is
    used. The same command and seed gave SAU Blended ASR 0.005 on one 2-core machine and 0.141 on another (issue
    28.5): float sums run in another order under other kernels or thread counts, and a defense amplifies that."""
    import platform

    build = _build_settings()
    info: dict[str, object] = {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": cpu_cores(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "blas": build.get("BLAS_INFO") or ("mkl" if torch.backends.mkl.is_available() else "unknown"),
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "os": f"{platform.system()} {platform.machine()}",
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def deterministic_requested() -> bool:
    """Whether ``BACKDOOR_LENS_DETERMINISTIC`` (1 / true / yes) asks for deterministic kernels in defense runs."""
    return os.environ.get("BACKDOOR_LENS_DETERMINISTIC", "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """Deterministic kernels inside the block (``torch.use_deterministic_algorithms(enabled, warn_only=True)``: an op
    without a deterministic implementation warns instead of failing; cuDNN deterministic, not benchmarking), the
    previous settings restored after it.

    Measured on the CPU (2-core AMD EPYC, AVX512, torch 2.14.1, MKL): it changes nothing there. FST ``quick`` and
    fine-tuning ``quick`` on ``demo:blended`` at seed 0 gave bit-identical weights in four runs each at one thread, two
    with it and two without (fine-tuning's CPU time 21.1-21.2 s without, 20.9-22.8 s with it), while the thread count
    itself changed them (FST: ASR 0.985 / BA 0.886 at one thread, 0.983 / 0.880 at two; 500 test images). What makes a CPU run repeat on one
    machine is the same thread count (``BACKDOOR_LENS_THREADS``), which :func:`machine_info` records; no switch makes
    two machines agree. On CUDA (not measured here) it removes the non-deterministic atomics of some kernels; cuBLAS
    also wants ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before it starts, or it warns."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
