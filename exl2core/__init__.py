"""exl2core: convert HuggingFace FP16 models to EXL2 for exllamav2."""

__version__ = "0.1.0"

from exl2core.hookspecs import hookimpl  # noqa: E402  (the decorator plugins use)

__all__ = ["hookimpl", "__version__"]
