"""What the machine computes with, in one place: whether it has native bfloat16, and a description of it for records.

A CPU without native bfloat16 (no AVX512_BF16, no AMX: e.g. an AVX2 laptop) runs bfloat16 matmuls by converting
every weight for every product, several times slower than float32; TRL's `SFTConfig` trains under bfloat16 autocast
by default (`bf16=None` → True). `native_bf16` decides for gradsift: the recipe runner's training and answer
generation, the benches, the online mode and `gradsift eval` ask it, so a recipe written on an AMX machine does not
crawl on an AVX2 one, and a user's own TRL/axolotl config that asks for bfloat16 there gets one warning
(`warn_slow_bf16`).

oneDNN's instruction-set cap counts (`ONEDNN_MAX_CPU_ISA=AVX2`, with `MKL_ENABLE_INSTRUCTIONS=AVX2` the way to try
an AVX2 machine on a bigger one): a cap below AVX512_CORE_BF16 means no native bfloat16, since oneDNN, which runs
torch's bfloat16 matmuls on a CPU, then does without the bfloat16 instructions. The MKL cap only slows float32.
"""

from __future__ import annotations

import logging
import os
import platform
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)

# oneDNN `ONEDNN_MAX_CPU_ISA` values at which its matmuls use bfloat16 dot-product instructions (AVX512_BF16, AMX).
_BF16_ISAS = frozenset(
    {
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX10_1_512",
        "AVX512_CORE_AMX",
        "AVX10_1_512_AMX",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512_AMX_FP16",
        "ALL",
        "DEFAULT",
    }
)
_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def _device_type(device: Any) -> str:
    return str(getattr(device, "type", device) or "cpu").split(":", 1)[0]


def _cpu_flag(name: str) -> bool:
    import torch

    probe = getattr(torch.cpu, name, None)
    return bool(probe and probe())


def _isa_cap() -> str:
    """oneDNN's instruction-set cap (`ONEDNN_MAX_CPU_ISA`), upper case; "" when none is set or it caps nothing
    (`ALL`, `DEFAULT`)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return "" if cap in ("ALL", "DEFAULT") else cap


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: AMX or AVX512_BF16, and no oneDNN cap below them."""
    cap = _isa_cap()
    if cap and cap not in _BF16_ISAS:
        return False
    return _cpu_flag("_is_amx_tile_supported") or _cpu_flag("_is_avx512_bf16_supported")


def native_bf16(device: Any = "cpu") -> bool:
    """Whether `device` ("cpu", "cuda", "cuda:1", a `torch.device`) computes bfloat16 natively: the one answer
    gradsift uses wherever it chooses or questions bfloat16."""
    import torch

    kind = _device_type(device)
    if kind == "cuda":  # emulated bfloat16 (a V100, a T4) is not native
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if kind == "cpu":
        return cpu_native_bf16()
    return False


def fast_bf16(device: Any = "cpu") -> bool:
    """Whether bfloat16 is the default where nothing asks (a recipe's `train.bf16: null`): a CUDA GPU with bfloat16, or
    a CPU with AMX. A CPU with AVX512_BF16 but no AMX computes bfloat16 natively yet keeps float32 by default."""
    if not native_bf16(device):
        return False
    return _device_type(device) == "cuda" or _cpu_flag("_is_amx_tile_supported")


def bf16_allowed(asked: bool, device: Any, what: str) -> bool:
    """`asked`, unless it asks for bfloat16 on a device without it natively: then False, logged once per `what`."""
    if asked and not native_bf16(device):
        _log_once(
            f"{what}: bfloat16 asked, but this {describe_device(device)['name']} has no native bfloat16"
            f"{' (no AMX or AVX512_BF16)' if _device_type(device) == 'cpu' else ''}: float32 instead, faster here"
        )
        return False
    return asked


def generation_dtype(asked: str | None, device: Any) -> str | None:
    """The dtype answers are generated in: `asked` (`evals.*.generation_dtype`), but float32 for bfloat16 on a device
    without it natively (logged once)."""
    if asked == "bfloat16" and not bf16_allowed(True, device, "generation_dtype"):
        return "float32"
    return asked


def warn_slow_bf16(bf16: bool | None, device: Any, where: str, *, autocast: bool = True) -> bool:
    """One warning when a user's own setting (`where`: the TRL or axolotl key, or gradsift's `dtype`) computes in
    bfloat16 on a CPU without it natively; gradsift does not change the user's setting. Returns whether it
    warned."""
    if not bf16 or _device_type(device) != "cpu" or native_bf16(device):
        return False
    how = "trains under bfloat16 autocast" if autocast else "computes in bfloat16"
    fix = "Set bf16 to false (TRL: `bf16=False`; axolotl: `bf16: false`)" if autocast else "Set it to float32 or auto"
    _log_once(
        f"{where} {how} on a {describe_device(device)['name']} without native bfloat16 (no AMX or AVX512_BF16): "
        f"every matmul converts its operands, several times slower than float32. {fix} unless you need bfloat16's "
        "numerics.",
        level=logging.WARNING,
        key=f"slow bf16, autocast {autocast}",  # one warning a process per kind, however many places see it
    )
    return True


_logged: set[str] = set()


def _log_once(message: str, level: int = logging.INFO, key: str | None = None) -> None:
    """Log `message` once a process (once per `key` when given), on the main process of a distributed run only."""
    if os.environ.get("RANK", "0") != "0" or (key or message) in _logged:
        return
    _logged.add(key or message)
    logger.log(level, message)


def describe_device(device: Any = "cpu") -> dict[str, Any]:
    """The machine a figure was measured on: {"name", "isa" | "cuda", "native_bf16", "threads", "torch", "emulated"}.

    `name` reads as "AMD EPYC (AVX-512, AVX512_BF16)" or "NVIDIA H100 80GB HBM3"; `emulated` lists the
    instruction-set caps set in the environment (they make a CPU compute like a smaller one)."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "native_bf16": native_bf16(device)}
    if _device_type(device) == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device if ":" in str(device) else None)
        return {**info, "name": gpu, "cuda": torch.version.cuda}
    isa = cpu_isa()
    caps = {name: os.environ[name] for name in _ISA_CAPS if os.environ.get(name)}
    name = f"{cpu_model()} ({isa})" + (f", capped by {' '.join(f'{k}={v}' for k, v in caps.items())}" if caps else "")
    return {**info, "name": name, "isa": isa, "threads": torch.get_num_threads(), "emulated": caps}


def machine_line(device: Any = "cpu") -> str:
    """ "AMD EPYC (AVX-512, AVX512_BF16), torch 2.13.0+cpu": the line a benchmark prints beside its figures."""
    described = describe_device(device)
    return f"{described['name']}, torch {described['torch']}"


def cpu_isa() -> str:
    """The CPU's vector instruction sets as torch and oneDNN use them: "AVX2", "AVX-512, AVX512_BF16", "AVX-512, AMX";
    under a oneDNN cap (`ONEDNN_MAX_CPU_ISA`) only those the cap leaves."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    parts = [{"AVX512": "AVX-512"}.get(capability, capability)]
    cap = _isa_cap()
    if _cpu_flag("_is_avx512_bf16_supported") and (not cap or cap in _BF16_ISAS):
        parts.append("AVX512_BF16")
    if _cpu_flag("_is_amx_tile_supported") and (not cap or "AMX" in cap):
        parts.append("AMX")
    return ", ".join(parts)


@cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else the platform's answer)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
