"""CLIP tokenizers: load one for a backbone, or write a small word-level one that needs no download.

The tiny backbones (tests, `backbone=tiny`, the shipped demo model) cannot use OpenAI's 49k BPE
vocabulary offline, so mozo writes a CLIP-format vocabulary (``vocab.json`` + ``merges.txt``) whose
merges assemble each listed word into a single token. Any `CLIPTokenizer` reads it, so the tiny and
the real backbones go through exactly the same tokenization code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

# Below this, a "loaded" tokenizer is the 2-token stub transformers can return offline.
MIN_VOCAB = 100


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one (ascii, lower-case) word under `ranks`: the pieces it ends with."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = {(a, b) for a, b in zip(pieces, pieces[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                out.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces


def write_word_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 32) -> Path:
    """Write a CLIP-format tokenizer whose vocabulary holds every byte plus each word of `words` whole."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    vocab: list[str] = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab)
    for word in sorted({w.lower() for w in words if w}):
        if not word.isascii() or not word.isalnum():
            raise ValueError(f"tokenizer words must be ascii letters/digits, got {word!r}")
        # BPE applies the lowest-ranked merge anywhere in the word, so merges written for other words
        # (e.g. "an") can split this one ("orange" -> "or an ge"). Run BPE with the merges so far and
        # join whatever pieces remain, left to right, with new merges ranked after all existing ones.
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                vocab.append(pair[0] + pair[1])
                known.add(pair[0] + pair[1])
            pieces = _bpe(word, ranks)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out


def load_tokenizer(source: str | Path, expected_vocab: int | None = None, local_only: bool = False):
    """Load the CLIP tokenizer of `source` (hub id or folder) and refuse a broken one.

    Offline, `from_pretrained` may hand back a stub with two special tokens; training with it would
    silently map every prompt to the same ids, so the vocabulary size is checked here.
    """
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(str(source), local_files_only=local_only)
    except Exception as exc:  # network errors, missing files, malformed json
        raise RuntimeError(
            f"cannot load the CLIP tokenizer from {source!r}: {type(exc).__name__}: {exc}. "
            "Give a local folder holding vocab.json and merges.txt, or a hub id reachable from this machine "
            "(downloaded files are cached under ~/.cache/huggingface)."
        ) from exc
    size = len(tok)
    if size < MIN_VOCAB or (expected_vocab is not None and size > expected_vocab):
        raise RuntimeError(
            f"the tokenizer loaded from {source!r} has {size} tokens"
            + (f" but the model's text embedding has {expected_vocab}" if expected_vocab else "")
            + "; this is the stub transformers returns when vocab.json/merges.txt are missing (offline?). "
            "Put the tokenizer files next to the weights or download them once with network access."
        )
    return tok
