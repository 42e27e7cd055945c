"""HF-compatible hybrid models (installed as `ipl_layers.models`); they arrive with the hybrid-model issue."""
