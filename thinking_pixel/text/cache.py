"""Caption embeddings computed once: an in-memory table per caption, optionally persisted as safetensors.

Training looks captions up by index (the dataset yields caption ids), so the text encoder runs once per unique
caption per run, not once per step; ``CaptionEmbeddings.save`` / ``load`` keep the table next to a run so a
resumed run (or a sampling command) does not run the encoder again for captions it has seen.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["CaptionEmbeddings"]


def _key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


class CaptionEmbeddings:
    """caption -> (hidden (L, D), pooled (D_p)), filled on demand by ``encoder.encode``.

    ``encoder``: anything with ``encode(captions) -> (hidden (N, L, D), pooled (N, D_p))`` (MiniLM, or a
    pipeline's text encoders); None for a read-only table (a lookup of an unknown caption then fails).
    """

    def __init__(self, encoder=None, dtype=torch.float32):
        self.encoder = encoder
        self.dtype = dtype
        self._hidden: dict[str, torch.Tensor] = {}
        self._pooled: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._hidden)

    def __contains__(self, caption: str) -> bool:
        return _key(caption) in self._hidden

    def add(self, captions: Sequence[str], batch_size: int = 256) -> None:
        """Encode the captions not yet in the table."""
        todo = sorted({c for c in captions if _key(c) not in self._hidden})
        if not todo:
            return
        if self.encoder is None:
            raise ValueError(f"{len(todo)} caption(s) have no cached embedding and no text encoder is loaded, "
                             f"e.g. {todo[0]!r}")
        hidden, pooled = self.encoder.encode(todo, batch_size=batch_size)
        for caption, h, p in zip(todo, hidden.to("cpu", self.dtype), pooled.to("cpu", self.dtype)):
            self._hidden[_key(caption)], self._pooled[_key(caption)] = h, p

    def lookup(self, captions: Sequence[str], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden (N, L, D), pooled (N, D_p)) float32 on ``device``; encodes unseen captions first."""
        self.add(captions)
        keys = [_key(c) for c in captions]
        hidden = torch.stack([self._hidden[k] for k in keys]).to(device, torch.float32)
        pooled = torch.stack([self._pooled[k] for k in keys]).to(device, torch.float32)
        return hidden, pooled

    def save(self, path: str | Path) -> Path:
        """Write the table atomically as safetensors (keys ``<sha1>.hidden`` / ``<sha1>.pooled``)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{k}.hidden": v.contiguous() for k, v in self._hidden.items()}
        tensors.update({f"{k}.pooled": v.contiguous() for k, v in self._pooled.items()})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    def load(self, path: str | Path) -> "CaptionEmbeddings":
        """Merge a table written by ``save`` (a missing file is fine: nothing cached yet)."""
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_file():
            for name, tensor in load_file(str(path)).items():
                key, kind = name.rsplit(".", 1)
                (self._hidden if kind == "hidden" else self._pooled)[key] = tensor.to(self.dtype)
        return self
