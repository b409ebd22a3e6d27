"""Text conditioning: frozen text encoders and the per-caption embedding cache."""

from .cache import CaptionEmbeddings
from .minilm import MINILM_DIM, MINILM_PACKAGE, MiniLMTextEncoder, TextEncoderMissing, minilm_dir

__all__ = ["MINILM_DIM", "MINILM_PACKAGE", "CaptionEmbeddings", "MiniLMTextEncoder", "TextEncoderMissing",
           "minilm_dir"]
