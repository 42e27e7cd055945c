"""Imports `ipl_layers.kernels` and `ipl_layers.models` from a source checkout.

`setup.py` installs the top-level folders `kernels/` and `models/` as `ipl_layers.kernels` / `ipl_layers.models`
(`package_dir`). Run from a checkout (`PYTHONPATH=<checkout>`) they sit next to this package, not inside it, so
Python would fall through to whatever install's editable finder is on the path, possibly another checkout's
folders. This finder, first on `sys.meta_path`, maps the two names to the folders of the checkout this package
itself was imported from. Installed from a wheel the folders are absent next to the package and nothing changes.

The checkout's root on `sys.path` also makes its `kernels/` folder shadow Hugging Face's `kernels` package, which
transformers imports (as setup.py notes for pip): the installed one is imported first, with the root out of the
path, so the name `kernels` keeps meaning it.
"""

import importlib.abc
import importlib.util
import os
import sys

MAPPED = ("kernels", "models")


class _SourceLayoutFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "ipl_layers" or name not in MAPPED:
            return None  # submodules are found through the mapped package's __path__
        folder = os.path.join(self.root, name)
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )


def _preload_installed_kernels(root: str):
    if "kernels" in sys.modules:
        return
    saved = list(sys.path)
    sys.path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    try:
        import kernels  # noqa: F401  (Hugging Face's, when installed)
    except ImportError:  # not installed: nothing to shadow
        pass
    finally:
        sys.path = saved


def install():
    """Puts the finder first on sys.meta_path when this package sits in a checkout holding kernels/ and models/."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # a checkout has setup.py next to the folders; site-packages has none (and may hold someone else's `models`)
    folders = [os.path.join(root, name, "__init__.py") for name in MAPPED]
    if not os.path.isfile(os.path.join(root, "setup.py")) or not all(map(os.path.isfile, folders)):
        return
    if not any(isinstance(f, _SourceLayoutFinder) and f.root == root for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceLayoutFinder(root))
    if any(os.path.abspath(p or os.getcwd()) == root for p in sys.path):
        _preload_installed_kernels(root)
