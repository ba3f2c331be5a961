"""Build script. Pure Python + Triton by default; the CUDA C++ fallback in csrc/ is built as
``steermoe._C`` when torch has CUDA and nvcc is found (``STEERMOE_BUILD_CUDA=1`` forces it, ``=0`` skips it).

The extension needs the installed torch at build time, so build it with
``pip install --no-build-isolation -e .`` (pip's default isolated build cannot see torch and skips it).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_NOTE = ("steermoe: CUDA fallback not built ({why}); Triton and torch backends only. "
             "To build it: STEERMOE_BUILD_CUDA=1 pip install --no-build-isolation -e .")


def _log(msg):
    print(msg, file=sys.stderr)


def _locate_cuda_home():
    """Set CUDA_HOME to the toolkit root when the ``nvcc`` on PATH is a wrapper outside it.

    torch guesses CUDA_HOME as the parent of nvcc's folder; for a wrapper script (e.g. /usr/local/bin/nvcc)
    that is wrong, so ask nvcc itself: ``nvcc --dryrun`` prints the toolkit root after ``TOP=``.
    """
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    if os.path.exists(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cuda_runtime.h")):
        return
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return
    for line in (dry.stdout + dry.stderr).splitlines():
        if "TOP=" in line:
            os.environ["CUDA_HOME"] = os.path.normpath(line.split("TOP=", 1)[1].strip())
            return


def cuda_extension():
    """Return ([ext], {"build_ext": ...}) or ([], {}) with a one-line reason when not building."""
    flag = os.environ.get("STEERMOE_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        _log(SKIP_NOTE.format(why="STEERMOE_BUILD_CUDA=0"))
        return [], {}
    forced = flag in ("1", "true", "yes", "on")
    try:
        import torch
    except ImportError:
        why = "torch is not importable in the build environment (use --no-build-isolation)"
        if forced:
            raise RuntimeError(f"STEERMOE_BUILD_CUDA=1 but {why}")
        _log(SKIP_NOTE.format(why=why))
        return [], {}
    if torch.version.cuda is not None:
        _locate_cuda_home()  # before cpp_extension reads CUDA_HOME at import
    from torch.utils import cpp_extension
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        why = ("torch is a CPU-only build" if torch.version.cuda is None
               else "nvcc not found: set CUDA_HOME to the toolkit root")
        if forced:
            raise RuntimeError(f"STEERMOE_BUILD_CUDA=1 but {why}")
        _log(SKIP_NOTE.format(why=why))
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = cpp_extension.CUDAExtension(
        name="steermoe._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # No -std flag: torch adds the C++ standard its own headers need (C++20 for recent releases).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    _log(f"steermoe: building the CUDA fallback for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def package_version() -> str:
    """``__version__`` of steermoe/__init__.py, read as text so that the build never imports the package."""
    with open(os.path.join(ROOT, "steermoe", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)


ext_modules, cmdclass = cuda_extension()

setup(
    name="steermoe",
    version=package_version(),
    description="Fused SteerMoE: a steered frozen Whisper encoder feeding a frozen LLM",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=["steermoe", "steermoe.kernels", "steermoe.demo"],
    package_data={"steermoe.demo": ["*.parquet", "*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.45",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyarrow>=14",
        "scipy>=1.10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "soundfile>=0.12",
        "jiwer>=3",
    ],
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4", "datasets>=2.14"],
                    "tensorboard": ["tensorboard>=2.10"], "plot": ["matplotlib>=3.5"]},
    entry_points={"console_scripts": ["steermoe=steermoe.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
