"""exl2core: convert HuggingFace FP16 models to EXL2 for exllamav2."""

__version__ = "0.1.0"
