"""Build of ipl-layers.

`kernels/` and `models/` are mapped into the `ipl_layers` namespace (`package_dir`), so nothing generic
lands at the top of site-packages. The C++ CPU extension `ipl_layers._C` is built from `csrc/cpu` when a
C++ compiler and torch are present; without them the package installs pure-Python and every op falls
back to its torch path. Install with `pip install --no-build-isolation -e .` after torch is installed,
so pip does not fetch a torch of its own into an isolated build environment. An editable install does not
rebuild the extension when its sources change: `python setup.py build_ext --inplace` does (the Makefile runs it).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

PACKAGES = {
    "ipl_layers": "ipl_layers",
    "ipl_layers.ops": "ipl_layers/ops",
    "ipl_layers.layers": "ipl_layers/layers",
    "ipl_layers.kernels": "kernels",
    "ipl_layers.models": "models",
}
# one package per kernel family folder, found rather than listed: a family missing here installs editable
# but is absent from a wheel
PACKAGES.update({
    f"ipl_layers.kernels.{os.path.basename(os.path.dirname(init))}": os.path.dirname(init)
    for init in sorted(glob.glob("kernels/*/__init__.py"))
})


def cpu_extension():
    """The optional C++ extension, or None when it cannot be built here."""
    if os.environ.get("IPL_NO_EXT") == "1":
        return None, {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("ipl-layers: torch not importable at build time; installing without the C++ extension", file=sys.stderr)
        return None, {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("ipl-layers: no C++ compiler; installing without the C++ extension", file=sys.stderr)
        return None, {}
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return None, {}
    ext = CppExtension(
        "ipl_layers._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return ext, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def preload_installed_kernels():
    """transformers depends on Hugging Face's `kernels`, which registers an egg_info writer that setuptools
    imports by module name (`kernels._internals...`) while this project's root, holding our own `kernels/`
    folder, is first on sys.path: a second `pip install -e .` then fails with "No module named
    'kernels._internals'". Importing the installed one first, with the root out of sys.path, caches it."""
    root = os.path.dirname(os.path.abspath(__file__))
    saved = list(sys.path)
    sys.path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    try:
        import kernels._internals.locking  # noqa: F401
    except ImportError:  # not installed (yet): nothing to shadow
        pass
    finally:
        sys.path = saved


preload_installed_kernels()
ext, cmdclass = cpu_extension()

setup(
    name="ipl-layers",
    version="0.1.0",
    description="Triton and CUDA kernels for in-parameter learning layers",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; sys_platform == 'linux'",
        "einops",
        "transformers",
        "safetensors",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",  # the eval's per-position loss plot
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "bench": ["flash-linear-attention", "titans-pytorch", "product-key-memory", "matplotlib"],
        "gpu": ["flash-attn"],
    },
    package_data={"ipl_layers.models": ["configs/*.yaml"]},
    # ipl-bench runs bench/ipl_bench.py of the checkout an editable install points at (ipl_layers/bench_cli.py)
    entry_points={"console_scripts": ["ipl-train = ipl_layers.models.train:main",
                                      "ipl-eval = ipl_layers.models.evaluate:main",
                                      "ipl-retrofit = ipl_layers.models.retrofit:main",
                                      "ipl-bench = ipl_layers.bench_cli:main"]},
    ext_modules=[ext] if ext is not None else [],
    cmdclass=cmdclass,
)
