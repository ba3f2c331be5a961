"""What ``steermoe info`` reports: versions, devices, and which backends of the steering op can run on each
device, with the reason when one cannot (:func:`steermoe.available_backends` with ``explain=True``)."""
import importlib.metadata
import os
import platform
from typing import Any, Dict, Optional

PACKAGES = ("triton", "transformers")         # reported from their metadata: importing them is not needed


def _installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_devices() -> list:
    """One line per visible CUDA device: name, compute capability and memory."""
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        gib = torch.cuda.get_device_properties(i).total_memory / 2 ** 30
        out.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor}, {gib:.1f} GiB)")
    return out


def environment_info() -> Dict[str, Any]:
    """``{steermoe, python, platform, torch, torch_cuda, triton, transformers, TRITON_INTERPRET, devices,
    backends: {device type: {backend: "available" | reason}}}``; works without CUDA."""
    import torch

    from . import __version__
    from .ops import available_backends

    info: Dict[str, Any] = {
        "steermoe": __version__, "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,      # the torch imported, and its CUDA build
        **{name: _installed_version(name) for name in PACKAGES},
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    has_cuda = torch.cuda.is_available()
    info["devices"] = ["cpu"] + (_cuda_devices() if has_cuda else [])
    kinds = ["cpu", "cuda"] if has_cuda else ["cpu"]
    info["backends"] = {kind: available_backends(kind, explain=True) for kind in kinds}
    return info


def format_environment(info: Dict[str, Any]) -> str:
    """``environment_info()`` as aligned text lines."""
    lines = [f"{key:<17}{value}" for key, value in (
        ("steermoe", info["steermoe"]),
        ("python", f"{info['python']} ({info['platform']})"),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda']})" if info["torch_cuda"]
         else f"{info['torch']} (CPU-only build)"),
        ("triton", info["triton"] or "not installed"),
        ("transformers", info["transformers"] or "not installed"),
        ("TRITON_INTERPRET", info["TRITON_INTERPRET"] or "unset"),
        ("devices", ", ".join(info["devices"]) + ("" if len(info["devices"]) > 1 else " (no CUDA device visible)")),
    )]
    for kind, backends in info["backends"].items():
        lines.append(f"backends on {kind}:")
        lines += [f"  {name:<8}{why}" for name, why in backends.items()]
    return "\n".join(lines)
