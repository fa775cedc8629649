"""hippo: lossless speculative decoding for video LLMs (the pipeline; kernels live in hippo_ext)."""
from __future__ import annotations

__version__ = "0.1.0"
