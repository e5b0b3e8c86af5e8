"""The package version, read by pyproject.toml (the wheel metadata) and rnnlm_ext.__version__."""

__version__ = "0.1.0"
