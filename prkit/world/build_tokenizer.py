"""Build the world's CLIP-format BPE tokenizer: every world word and identifier is one token.

Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into
prkit/world/tokenizer/. Byte-level base symbols keep unknown words tokenizable (as pieces).
Run: `python -m prkit.world.build_tokenizer [--out DIR]`. Owns no model code.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .vocab import world_words

log = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 32


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply CLIP's BPE (lowest-rank pair first, '</w>' on the last symbol) to one word."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, _ = min(pairs)
        if rank == 1 << 30:
            break
        first, second = min((p for p in zip(parts, parts[1:]) if ranks.get(p) == rank))
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges (in rank order) under which every word becomes the single token 'word</w>'.

    New merges are only appended (lowest priority), so words already finished stay one token.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def build_tokenizer(out: Path = TOKENIZER_DIR) -> Path:
    """Write the tokenizer folder; returns its path."""
    words = world_words()
    base = list(bytes_to_unicode().values())
    merges = build_merges(words)
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    log.info("wrote %s: %d tokens, %d merges, %d world words", out, len(vocab), len(merges), len(words))
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_tokenizer(args.out)


if __name__ == "__main__":
    main()
