"""Class accuracy of shapes samples (`thinking-pixel evaluate --metric accuracy`)."""

import json

import numpy as np

from thinking_pixel import cli
from thinking_pixel.data import ShapesDataset
from thinking_pixel.evaluate import PLACEMENT_DATA_IMAGES
from thinking_pixel.metrics.accuracy import class_accuracy, main_objects, placement, placement_match

TINY = ["--image-size", "16", "--patch-size", "4", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
        "--rank", "4", "--batch-size", "4", "--no-progress", "--no-sample-grid", "--threads", "1"]


def test_training_images_are_read_correctly_and_wrong_labels_are_not():
    ds = ShapesDataset(image_size=16, num_samples=32)
    images, labels = zip(*(ds.render(i) for i in range(len(ds))))
    parts = [ds.label_parts(y) for y in range(ds.num_classes)]
    found = main_objects(images)
    right = class_accuracy(found, labels, parts, list(ds.class_names))
    assert right["accuracy"] == right["shape_accuracy"] == right["color_accuracy"] == 1.0
    assert right["per_class"]["a red circle"]["n"] == 2
    shifted = class_accuracy(found, [(y + 1) % ds.num_classes for y in labels], parts, list(ds.class_names))
    # label = shape * 4 + colour: the next label has the next colour, and the same shape for 3 colours of 4
    assert shifted["accuracy"] == shifted["color_accuracy"] == 0.0 and shifted["shape_accuracy"] == 0.75
    spread = placement(found, 16)
    assert spread["n"] == 32 and 0.4 < spread["x_mean"] < 0.6 and spread["x_std"] > 0.03
    assert class_accuracy([None], [0], parts, list(ds.class_names))["detected"] == 0.0


def test_placement_match_tells_the_data_from_centred_objects():
    ds = ShapesDataset(image_size=16, num_samples=256)
    data = main_objects([ds.render(i)[0] for i in range(len(ds))])
    same = placement_match(data[:128], data[128:], 16)
    assert all(same[k]["p"] > 0.01 and 0.7 < same[k]["std_ratio"] < 1.4 for k in ("x", "y", "size"))
    # the largest shapes sit in the middle: a model that draws only them has the data's positions squeezed
    big = sorted((o for o in data if o is not None), key=lambda o: o.area)[-64:]
    squeezed = placement_match(big, data, 16)
    assert squeezed["x"]["std_ratio"] < 0.8 and squeezed["size"]["ks"] > 0.5 and squeezed["size"]["p"] < 1e-6
    assert placement_match([None, None], data, 16) == {}


def test_evaluate_accuracy_command(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--output-dir", str(run), "--max-steps", "1", *TINY]) == 0
    out = tmp_path / "acc.json"
    argv = ["evaluate", "--checkpoint", str(run), "--metric", "accuracy", "--output", str(out), "--num-samples", "16",
            "--num-steps", "2", "--no-progress", "--threads", "1"]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert f"writing {out}; samples kept in {tmp_path / 'acc_samples'}" in printed  # where the outputs go
    assert set(json.loads(printed.strip().splitlines()[-1])) == {
        "accuracy", "shape_accuracy", "color_accuracy", "mean_recursion_steps"}  # the default model recurses
    assert result["num_samples"] == 16 and result["sampler"] == "ddpm" and result["cfg_scale"] == 4.0
    assert 0 <= result["accuracy"] <= result["shape_accuracy"] <= 1 and len(result["per_class"]) <= 16
    assert result["cfg_interval"] == [0, 300]  # the sample command's default
    assert result["data_accuracy"] == 1.0 and result["placement"]["data"]["n"] == PLACEMENT_DATA_IMAGES
    match = result["placement"]["match"]  # a 1-step model draws noise: few detections, maybe too few to compare
    assert set(match) == ({"x", "y", "size"} if result["placement"]["samples"]["n"] >= 2 else set())
    assert all(0 <= m["ks"] <= 1 and 0 <= m["p"] <= 1 for m in match.values())
    assert np.isclose(result["placement"]["data"]["x_mean"], 0.5, atol=0.1)
