"""The run's data: subsets and instance examples, class images for prior preservation, the streams."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from flatlora_diffusion.data.class_pools import ClassStreams
from flatlora_diffusion.data.dataset_config import resolve_subsets
from flatlora_diffusion.data.examples import subset_examples
from flatlora_diffusion.data.masks import attach_masks
from flatlora_diffusion.data.prior import existing_class_images, generate_class_images
from flatlora_diffusion.data.streams import make_stream
from flatlora_diffusion.sdxl.models import SDXLParts
from flatlora_diffusion.sdxl.sampling import pipeline_from_parts

from .config import TrainConfig


def build_streams(config: TrainConfig, subsets, instance_examples):
    """The instance stream and, with prior preservation, the class streams (square or bucketed)."""
    instances = make_stream(instance_examples, config.seed, config.resolution, 1, config.aspect_buckets)
    return instances, ClassStreams.build(subsets, config.seed, config.resolution, config.aspect_buckets)


def load_instances(config: TrainConfig):
    """The resolved subsets, their instance examples (with masks under --masked_loss) and a line to say."""
    subsets = resolve_subsets(config)
    examples = subset_examples(subsets)
    if not config.masked_loss:
        return subsets, examples, None
    return subsets, *attach_masks(examples)


def prepare_class_images(config: TrainConfig, parts: SDXLParts, accelerator: Accelerator, folder: Path,
                         prompt: str) -> None:
    """Generate the missing class images, split across processes (every rank counts, then all write)."""
    have = len(existing_class_images(folder))
    accelerator.wait_for_everyone()
    if have < config.num_class_images:
        pipe = pipeline_from_parts(parts, parts.unet, parts.text_encoder, parts.text_encoder_2)
        with accelerator.autocast():
            generate_class_images(pipe, folder, prompt, config.num_class_images,
                                  config.sample_batch_size, config.resolution, config.seed,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes, have=have)
    accelerator.wait_for_everyone()


def prepare_class_pools(config: TrainConfig, subsets, parts: SDXLParts, accelerator: Accelerator) -> None:
    """Fill every generated class pool's folder (kohya regularisation folders are used as they are)."""
    pools = dict.fromkeys(s.classes for s in subsets if s.classes is not None and s.classes.generate)
    for folder in dict.fromkeys(f for pool in pools for f in pool.folders):
        prepare_class_images(config, parts, accelerator, Path(folder.folder), folder.prompt)
