"""A small CLIP BPE vocabulary built in code, so the default model needs no download.

Every word in WORDS becomes one token; anything else falls back to byte tokens, exactly as
CLIP's byte-level BPE does for rare words. The files written are the ordinary
`vocab.json` + `merges.txt` pair that `CLIPTokenizer.from_pretrained` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black", "pink", "gray",
           "brown", "cyan")
SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "heart", "hexagon", "diamond")
HELPERS = ("a", "an", "the", "of", "on", "in", "with", "and", "background", "photo", "picture",
           "small", "large", "big", "left", "right", "top", "bottom", "center", "shape",
           "pattern", "striped", "dotted", "style", "icon", "dog", "cat", "person", "cup",
           "coffee", "rocket", "astronaut", "toy", "object")
# Rare tokens for DreamBooth subjects (one token each, unseen in pretraining).
SUBJECT_TOKENS = ("sks", "zwx", "ohwx", "tok")
WORDS = COLOURS + SHAPES + HELPERS + SUBJECT_TOKENS


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable character table (mirrors transformers' bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging as the BPE model does it: lowest-ranked adjacent pair first."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def build_vocab(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) in which every word of `words` is a single token.

    For each word we run BPE with the merges so far and append a merge for the first pair
    left over until the word is one symbol. Appended merges rank last, so they never change
    how earlier words tokenize.
    """
    byte_chars = list(_bytes_to_unicode().values())
    tokens: list[str] = byte_chars + [c + "</w>" for c in byte_chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            tokens.append(symbols[0] + symbols[1])
            symbols = _apply_merges(symbols, ranks)
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    return vocab, merges


def save_tokenizer_files(folder: str | Path, max_length: int = 32) -> None:
    """Write vocab.json, merges.txt and the tokenizer config into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    pairs = [tuple(rule.split(" ")) for rule in merges]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=max_length)
    tokenizer.save_pretrained(folder)


def vocab_size() -> int:
    return len(build_vocab()[0])
