"""The README's main job: the dense digits DiT (``configs/dit_digits.py``)."""
from configs.dit_digits import get_config  # noqa: F401
