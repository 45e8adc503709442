"""flatlora-diffusion: Flat-LoRA fine-tuning for Stable Diffusion XL."""

import logging

from .flat.flat_lora import FlatLora, FlatLoraError, sigma_at


class _DropTorchvisionNotice(logging.Filter):
    """transformers announces on import that image processors fall back to PIL without
    torchvision; we never use image processors, so the notice is only noise for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def _quiet_transformers_import_notice() -> None:
    from transformers.utils import logging as hf_logging

    for handler in hf_logging._get_library_root_logger().handlers:
        handler.addFilter(_DropTorchvisionNotice())


_quiet_transformers_import_notice()

__version__ = "0.1.0"
__all__ = ["FlatLora", "FlatLoraError", "sigma_at", "__version__"]
