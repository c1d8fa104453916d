"""Prompts -> token chunks -> the UNets' conditioning (context and pooled embeddings).

A prompt of up to 75 tokens is one chunk, ``[BOS] tokens [EOS] pad...`` of 77, exactly what diffusers'
SDXL pipelines feed the encoders. Longer prompts are split into 75-token chunks that are encoded as
separate rows and concatenated along the sequence axis (S = 77 k), instead of being silently cut;
the pooled embedding comes from the first chunk. The positive and negative prompts of one image get
the same number of chunks (the shorter padded with empty chunks) so they batch together.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from sdxl_trt.contracts import TOKENS_PER_CHUNK
from sdxl_trt.errors import InvalidRequestError

CONTENT_TOKENS = TOKENS_PER_CHUNK - 2


class PromptTokenizer:
    """SDXL's two CLIP tokenizers (same vocabulary; tokenizer_2 pads with ``!`` instead of EOS)."""

    def __init__(self, directory: Path) -> None:
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.bos = int(self.tokenizer.bos_token_id)
        self.eos = int(self.tokenizer.eos_token_id)
        self.pad = int(self.tokenizer.pad_token_id)

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - tokenizers live as long as their pipeline
    def content_ids(self, prompt: str) -> tuple[int, ...]:
        """Token ids without BOS/EOS; cached, since a request is checked before queueing and encoded later."""
        return tuple(self.tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids)

    def chunk(self, ids: tuple[int, ...], n_chunks: int) -> torch.Tensor:
        """``[n_chunks, 77]`` ids: BOS + up to 75 tokens + EOS + padding per chunk."""
        rows = []
        for c in range(n_chunks):
            part = ids[c * CONTENT_TOKENS : (c + 1) * CONTENT_TOKENS]
            row = [self.bos, *part, self.eos]
            rows.append(row + [self.pad] * (TOKENS_PER_CHUNK - len(row)))
        return torch.tensor(rows, dtype=torch.int64)


def chunks_needed(*token_lists: tuple[int, ...]) -> int:
    return max(1, *(-(-len(t) // CONTENT_TOKENS) for t in token_lists))


def check_chunks(n: int, max_chunks: int, prompt: str, *, param: str = "prompt") -> None:
    if n > max_chunks:
        raise InvalidRequestError(
            f"{param} is over {(n - 1) * CONTENT_TOKENS} tokens ({n} chunks of 75) but the engines were built for "
            f"at most {max_chunks} chunks ({max_chunks * CONTENT_TOKENS} tokens): shorten it or rebuild with "
            f"--max-prompt-chunks {n} ({param} starts {prompt[:40]!r})",
            param=param,
        )
