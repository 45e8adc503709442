"""Former home of the noisy linear (now flat/noisy_ops.py); kept so that old imports still work."""

from .gaussian import perturbed_weight
from .noisy_ops import layer_noise, noisy_linear

__all__ = ["layer_noise", "noisy_linear", "perturbed_weight"]
