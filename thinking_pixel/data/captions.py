"""Captioned images in Hugging Face's imagefolder layout: ``root/metadata.jsonl`` with ``file_name`` and ``text``.

    root/
      metadata.jsonl     {"file_name": "0001.png", "text": "a red circle left of a blue square"}  (one per line)
      0001.png ...       (file_name is relative to root; subdirectories are fine)

``ds[i] -> (image (C, S, S) float32 in [-1, 1], label int)`` like every ImageDataset, where the label indexes the
distinct captions: ``ds.class_names[label]`` (= ``ds.caption(label)``) is the image's caption, so a text encoder
embeds the vocabulary once and training looks captions up by label. Images are centre-cropped and resized like
the class folders (ADM/DiT preprocessing).
"""

from __future__ import annotations

import json
from pathlib import Path

from .folder import IMAGE_EXTENSIONS, ImageFilesDataset

__all__ = ["CaptionFolderDataset"]


class CaptionFolderDataset(ImageFilesDataset):
    """Images listed in ``root/metadata.jsonl`` with their captions (column ``caption_column``, default "text")."""

    def __init__(self, root: str | Path, image_size: int = 32, num_channels: int = 3, caption_column: str = "text"):
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
        root = Path(root)
        metadata = root / "metadata.jsonl"
        if not metadata.is_file():
            raise FileNotFoundError(f"{metadata} not found: --dataset captions expects an image folder with a "
                                    "metadata.jsonl of {\"file_name\": ..., \"text\": ...} lines")
        rows: list[tuple[Path, str]] = []
        for n, line in enumerate(metadata.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row[caption_column]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{metadata}:{n}: expected a JSON object with 'file_name' and "
                                 f"'{caption_column}', got {line[:80]!r} ({e})") from None
            if not isinstance(text, str):
                raise ValueError(f"{metadata}:{n}: '{caption_column}' must be a string, got {text!r}")
            path = root / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                raise FileNotFoundError(f"{metadata}:{n}: image {path} does not exist or is not an image file")
            rows.append((path, text))
        if not rows:
            raise ValueError(f"{metadata} lists no images")
        self.class_names = tuple(sorted({text for _, text in rows}))
        label = {text: i for i, text in enumerate(self.class_names)}
        self.samples = [(path, label[text]) for path, text in rows]
        self.image_size, self.num_channels = image_size, num_channels
