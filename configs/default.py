"""The README's main job: KIND on the embedded digits (``configs/kind_digits.py``).

The dense DiT on the same data is ``configs/dit_digits.py``.
"""
from configs.kind_digits import get_config  # noqa: F401
