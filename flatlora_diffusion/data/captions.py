"""Caption dropout and tag shuffling, drawn per sample from (seed, batch number, position).

Semantics follow kohya sd-scripts (`process_caption` in library/train_util.py): a caption is
split at commas and each tag stripped; the first `keep_tokens` tags stay in place (the trigger
stays first), the others are shuffled, and the caption is joined back with ", ". A dropped caption
becomes the empty prompt, which trains the unconditional branch: with SDXL's
`force_zeros_for_empty_prompt` (the SDXL default) that is all-zero embeddings, the input the
pipeline gives classifier-free guidance (else the encoded empty prompt; see BatchMaker.embeds).
Only instance captions are changed; class prompts stay as they are (prior preservation keeps the
class prompt's own output).

The draws are a function of (seed, global batch number, position in the batch), the same under
any number of processes and after a resume.
"""

from __future__ import annotations

import numpy as np

from .examples import derived_seed

DROPPED = ""  # the empty prompt: BatchMaker.embeds gives it zero embeddings


def shuffle_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
    tags = [tag.strip() for tag in caption.strip().split(",")]
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    flexible = [flexible[k] for k in rng.permutation(len(flexible))]
    return ", ".join(fixed + flexible)


def augment_captions(prompts: list[str], config, batch_number: int) -> list[str]:
    """The captions trained on: each maybe dropped (--caption_dropout_rate), else maybe shuffled."""
    if not config.caption_dropout_rate and not config.shuffle_caption:
        return prompts
    augmented = []
    for position, prompt in enumerate(prompts):
        rng = np.random.default_rng(derived_seed("caption", config.seed, batch_number, position))
        if rng.random() < config.caption_dropout_rate:
            augmented.append(DROPPED)
        elif config.shuffle_caption:
            augmented.append(shuffle_tags(prompt, config.keep_tokens, rng))
        else:
            augmented.append(prompt)
    return augmented
