"""Imports ipl_layers before any test module here imports transformers: run from the checkout's root (`python -m
pytest` puts it on sys.path), our `kernels/` folder would otherwise shadow Hugging Face's `kernels` package that
transformers imports; `ipl_layers` loads the installed one first (see `ipl_layers/_source_layout.py`)."""

import ipl_layers  # noqa: F401
