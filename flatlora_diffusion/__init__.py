"""flatlora-diffusion: Flat-LoRA fine-tuning for Stable Diffusion XL."""

from .flat_lora import FlatLora, FlatLoraError, sigma_at

__version__ = "0.1.0"
__all__ = ["FlatLora", "FlatLoraError", "sigma_at", "__version__"]
