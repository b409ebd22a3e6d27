"""Datasets: determinism, ranges, formats (IDX, folders, latents) and the resumable data order."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from thinking_pixel.data import ShapesDataset, StepBatchSampler, read_idx, render_shape
from thinking_pixel.datasets import DATASETS, make_dataset


def _check_item(ds, index, channels, size):
    x, y = ds[index]
    assert x.dtype == torch.float32 and x.shape == (channels, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert isinstance(y, int) and 0 <= y < ds.num_classes
    return x, y


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("size", [8, 16, 33])
def test_shapes_any_resolution(size):
    ds = ShapesDataset(image_size=size, num_samples=40)
    for i in range(0, 40, 7):
        x, y = _check_item(ds, i, 3, size)
        assert y == i % 16
        assert x.max() > -1, "every sample shows a shape"


def test_shapes_deterministic_by_seed():
    a, b, c = ShapesDataset(seed=1), ShapesDataset(seed=1), ShapesDataset(seed=2)
    for i in (0, 5, 1234):
        assert torch.equal(a[i][0], b[i][0])
    assert not torch.equal(a[5][0], c[5][0])


def test_shapes_classes_and_captions():
    ds = ShapesDataset(num_shapes=3, num_colours=2)
    assert ds.num_classes == 6
    assert ds.caption(0) == "a red circle" and ds.caption(5) == "a green triangle"
    assert ds.label_parts(3) == ("square", "green")
    with pytest.raises(ValueError, match="label"):
        ds.caption(6)
    with pytest.raises(ValueError, match="num_shapes"):
        ShapesDataset(num_shapes=0)
    with pytest.raises(ValueError, match="max_angle"):
        ShapesDataset(max_angle=270)


def test_shapes_rotation_range():
    def square_is_axis_aligned(ds, index):
        image = ds.render(index)[0].max(axis=0)  # (H, W) brightest channel
        full = image >= image.max() - 1  # fully covered pixels
        rows, cols = full.any(axis=1).nonzero()[0], full.any(axis=0).nonzero()[0]
        return bool(full[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all())  # they fill their bounding box

    upright = ShapesDataset(image_size=32, num_shapes=2, max_angle=0)
    rotated = ShapesDataset(image_size=32, num_shapes=2, max_angle=180)
    squares = [i for i in range(40) if upright.label_parts(i % upright.num_classes)[0] == "square"]
    assert all(square_is_axis_aligned(upright, i) for i in squares)
    assert not all(square_is_axis_aligned(rotated, i) for i in squares)


def test_shapes_colour_matches_label():
    ds = ShapesDataset(image_size=16, num_samples=32)
    for i in range(16):
        image, label = ds.render(i)
        _, colour = ds.label_parts(label)
        mask = image.max(axis=0) > 100  # the shape's pixels
        mean = image[:, mask].mean(axis=1)
        expected = {"red": 0, "green": 1, "blue": 2}.get(colour)
        if expected is not None:
            assert mean.argmax() == expected, (colour, mean)
        else:  # yellow: red and green high, blue low
            assert mean[2] < 0.5 * min(mean[0], mean[1])


def test_render_shape_geometry():
    # A point at 0.65 * radius along the diagonal is inside the square (half side 0.72) but outside the circle (0.85).
    size, r = 64, 0.4
    corner = int((0.5 + 0.65 * r) * size)  # local coordinates ~(0.65, 0.65)
    square = render_shape("square", (255, 255, 255), size, (0.5, 0.5), r, 0.0)
    circle = render_shape("circle", (255, 255, 255), size, (0.5, 0.5), r, 0.0)
    assert square[0, corner, corner] == 255 and circle[0, corner, corner] == 0
    assert square[0, size // 2, size // 2] == circle[0, size // 2, size // 2] == 255


# ---------------------------------------------------------------------------------------------- digits
def test_digits():
    ds = make_dataset("digits", image_size=16)
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.caption(3) == "the digit 3"
    x, _ = _check_item(ds, 0, 1, 16)
    assert x.min() == -1 and x.max() > 0.5
    assert make_dataset("digits", image_size=8, num_channels=3)[0][0].shape == (3, 8, 8)


# ---------------------------------------------------------------------------------------------- fashion-mnist
def _write_idx(path, array, gz):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz)
    ds = make_dataset("fashion_mnist", root=tmp_path, image_size=28, split="test")
    assert len(ds) == 5 and ds.caption(0) == "T-shirt/top"
    x, y = _check_item(ds, 2, 1, 28)
    assert y == 4
    torch.testing.assert_close(x[0], torch.from_numpy(images[2]).float() / 127.5 - 1)
    assert make_dataset("fashion_mnist", root=tmp_path, image_size=16, split="test")[0][0].shape == (1, 16, 16)


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        make_dataset("fashion_mnist", root=tmp_path)
    (tmp_path / "bad-idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad-idx")
    truncated = _write_idx(tmp_path / "short-idx", np.zeros((4, 2), np.uint8), gz=False)
    truncated.write_bytes(truncated.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(truncated)


# ---------------------------------------------------------------------------------------------- folder
def test_image_folder(tmp_path):
    for name, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 24), colour).save(tmp_path / name / f"{i}.png")
    ds = make_dataset("folder", root=tmp_path, image_size=16)
    assert ds.class_names == ("cats", "dogs") and len(ds) == 4
    x, y = _check_item(ds, 3, 3, 16)
    assert y == 1 and x[2].min() == 1 and x[0].max() == -1  # blue
    assert make_dataset("folder", root=tmp_path, image_size=8, num_channels=1)[0][0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="needs a data directory"):
        make_dataset("folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        make_dataset("folder", root=tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- latents
def test_latents_layouts(tmp_path):
    from safetensors.torch import save_file

    latents = torch.randn(6, 4, 8, 8)
    labels = torch.tensor([0, 2, 1, 2, 0, 1])
    save_file({"latents": latents, "labels": labels}, tmp_path / "l.safetensors")
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "latents.npy", latents.numpy())
    np.save(tmp_path / "npy" / "labels.npy", labels.numpy())
    fast = tmp_path / "fast"
    (fast / "imagenet_features").mkdir(parents=True)
    (fast / "imagenet_labels").mkdir()
    for i in range(6):  # fast-DiT stores (1, C, h, w) features and (1,) labels, one file per sample
        np.save(fast / "imagenet_features" / f"{i}.npy", latents[i : i + 1].numpy())
        np.save(fast / "imagenet_labels" / f"{i}.npy", labels[i : i + 1].numpy())
    for root in (tmp_path / "l.safetensors", tmp_path / "npy", fast):
        ds = make_dataset("latents", root=root)
        assert ds.is_latent and ds.num_classes == 3 and ds.num_channels == 4 and ds.image_size == 8
        x, y = ds[4]
        torch.testing.assert_close(x, latents[4])
        assert y == 0
    assert make_dataset("latents", root=tmp_path / "npy", scale=0.5, num_classes=10).num_classes == 10
    torch.testing.assert_close(make_dataset("latents", root=tmp_path / "npy", scale=0.5)[1][0], latents[1] * 0.5)
    with pytest.raises(ValueError, match="does not match"):
        make_dataset("latents", root=tmp_path / "npy", image_size=16)
    with pytest.raises(FileNotFoundError, match="no latents"):
        make_dataset("latents", root=tmp_path)


# ---------------------------------------------------------------------------------------------- registry
def test_make_dataset_errors():
    assert set(DATASETS) == {"shapes", "compositional", "digits", "fashion_mnist", "folder", "latents", "captions",
                             "frozenlake"}
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("imagenet")
    with pytest.raises(ValueError, match="does not take"):
        make_dataset("digits", num_shapes=3)


# ---------------------------------------------------------------------------------------------- data order
def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_step_batch_sampler_resumes_exactly():
    full = _take(StepBatchSampler(10, 3, seed=4), 9)  # 3 batches per epoch, 3 epochs
    assert _take(StepBatchSampler(10, 3, seed=4, start_step=4), 5) == full[4:]
    for epoch in range(3):
        indices = sum(full[3 * epoch : 3 * epoch + 3], [])
        assert len(set(indices)) == 9 and set(indices) <= set(range(10))  # a permutation, last batch dropped
    assert full[:3] != full[3:6], "each epoch has its own order"
    assert _take(StepBatchSampler(10, 3, seed=5), 3) != full[:3]
    assert StepBatchSampler(10, 3).position(7) == {"epoch": 2, "batch": 1}
    with pytest.raises(ValueError, match="fewer than batch_size"):
        StepBatchSampler(2, 3)
