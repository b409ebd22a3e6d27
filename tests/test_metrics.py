"""Offline FID extractor: converted torch-fidelity weights reproduce the TorchScript pool3 features; FID/KID sanity."""

import pytest
import torch

from thinking_pixel.metrics import fid as fidmod


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache directory, so the test exercises the conversion itself (and leaves ~/.cache alone)."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("tp_cache")
    mp.setenv("THINKING_PIXEL_CACHE", str(path))
    yield path
    mp.undo()


def test_converted_extractor_matches_torchscript(cache):
    weights = fidmod.inception_weights_path()
    assert weights.parent == cache and weights.is_file()
    assert fidmod.inception_weights_path() == weights  # second call reuses the cached file

    extractor = fidmod.load_feature_extractor(weights)
    reference = torch.jit.load(str(fidmod.torchscript_inception_path()), map_location="cpu").eval()
    # 299x299 input: torch-fidelity's resize is then the identity, so both nets see the same pixels.
    images = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (ours,) = extractor(images)  # (1, 2048)
        theirs = reference((images.float() - 128) / 128)  # fid-helper's TF input range [-1, 0.9921875]
    assert ours.shape == theirs.shape == (1, 2048)
    assert theirs.abs().max() > 0.1  # non-trivial features
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two 2048x2048 eigendecompositions inside torch-fidelity (~20 s CPU each)
def test_fid_self_zero_shifted_positive_and_reference_cache(cache):
    g = torch.Generator().manual_seed(0)
    real = (torch.rand(3, 1, 28, 28, generator=g) * 160).to(torch.uint8)
    shifted = (real.int() + 80).clamp(max=255).to(torch.uint8)

    same = fidmod.compute_metrics(real, real, reference_cache_name="unit-real")
    assert abs(same["fid"]) < 1e-2
    cached = list((cache / "fidelity").glob("unit-real-*"))
    assert cached, "reference features/statistics were not cached"

    moved = fidmod.compute_metrics(shifted, real, reference_cache_name="unit-real")
    assert moved["fid"] > 1.0
    assert moved["kid_mean"] > same["kid_mean"]
    assert moved["num_generated"] == moved["num_reference"] == 3


def test_precision_recall(cache):
    g = torch.Generator().manual_seed(0)
    real = (torch.rand(6, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    same = fidmod.compute_metrics(real, real, fid=False, kid=False, prc=True)
    assert same["precision"] == same["recall"] == 1.0  # every point lies in its own k-NN ball
    # mode collapse: six copies of one image have k-NN radius 0, so no real image is recalled
    collapsed = torch.full_like(real, 128)
    assert fidmod.compute_metrics(collapsed, real, fid=False, kid=False, prc=True)["recall"] == 0.0


def test_bad_inputs_are_rejected(cache):
    ok = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        fidmod.ImageTensorDataset(ok.float())
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        fidmod.ImageTensorDataset(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="logits"):
        fidmod.compute_metrics(ok, ok, isc=True)


def test_to_uint8_range():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert fidmod.to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]
