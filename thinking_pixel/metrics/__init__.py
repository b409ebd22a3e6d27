"""Sample-quality metrics (FID / KID via torch-fidelity with offline InceptionV3 weights)."""

from .fid import (
    IS_UNAVAILABLE_REASON,
    ImageTensorDataset,
    cache_dir,
    compute_metrics,
    inception_weights_path,
    load_feature_extractor,
    to_uint8,
)

__all__ = [
    "IS_UNAVAILABLE_REASON",
    "ImageTensorDataset",
    "cache_dir",
    "compute_metrics",
    "inception_weights_path",
    "load_feature_extractor",
    "to_uint8",
]
