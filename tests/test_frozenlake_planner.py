"""The FrozenLake diffusion planner: dataset, image-conditioned DiT, train -> evaluate round trip on the CLI."""

import json

import numpy as np
import pytest
import torch

from thinking_pixel import cli
from thinking_pixel.tasks import frozenlake as fl
from thinking_pixel.datasets import make_dataset
from thinking_pixel.models import DiT, dit_config
from thinking_pixel.tasks.frozenlake.data import FrozenLakeDataset
from thinking_pixel.tasks.frozenlake.planner import DiffusionPlanner, evaluation_maps, frames_to_images

TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--rank", "4", "--batch-size", "4",
        "--no-progress", "--threads", "1", "--dataset", "frozenlake", "--image-size", "20"]


def test_dataset_items_are_shortest_path_moves():
    ds = make_dataset("frozenlake", image_size=20, seed=3, num_samples=50)
    assert isinstance(ds, FrozenLakeDataset) and ds.cond_channels == 3 and ds.canvas == 5
    for i in range(50):
        after, label, before = ds[i]
        assert after.shape == before.shape == (3, 20, 20) and label == 0
        a, b = frames_to_images(torch.stack([before, after]))
        lake, pos, new_pos = ds.transition(i)
        action = fl.decode_action(a, b)
        assert action in fl.optimal_actions(lake, pos)
        assert fl.step(lake, pos, action)[0] == new_pos
    again = make_dataset("frozenlake", image_size=20, seed=3, num_samples=50)
    assert all(torch.equal(ds[i][0], again[i][0]) for i in range(5))
    with pytest.raises(ValueError, match="image_size"):
        FrozenLakeDataset(image_size=12)


def test_evaluation_maps_are_held_out_and_sized():
    maps = evaluation_maps({"image_size": 20, "seed": 0}, canvas=5, num_maps=20)
    assert sorted(maps) == [4, 5] and all(len(m) == s for s, ms in maps.items() for m in ms)
    train = set(FrozenLakeDataset(image_size=20, seed=0, num_samples=1).maps)
    assert not train & set(maps[4])
    with pytest.raises(ValueError, match="map sizes"):
        evaluation_maps({"image_size": 20}, canvas=5, num_maps=2, sizes=[6])


def test_image_conditioned_dit_needs_its_condition():
    model = DiT(dit_config("DiT-N/4", input_size=8, in_channels=3, num_classes=1, cond_channels=3, depth=1,
                           hidden_size=32, num_heads=2))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    assert model(x, t, y, cond_image=torch.randn(2, 3, 8, 8)).shape == (2, 6, 8, 8)
    with pytest.raises(ValueError, match="cond_image"):
        model(x, t, y)
    with pytest.raises(ValueError, match="cond_channels"):
        DiT(dit_config("DiT-N/4", input_size=8, depth=1))(x, t, y, cond_image=x)
    planner = DiffusionPlanner(model, num_steps=2)
    frames = [fl.render(("SF", "FG"), (0, 0))]
    assert planner(frames)[0].size == (8, 8) and planner.calls == 1
    with pytest.raises(ValueError, match="image-conditioned"):
        DiffusionPlanner(DiT(dit_config("DiT-N/4", input_size=8, depth=1)))


@pytest.mark.parametrize("recursion", [[], ["--no-recursion"]])
def test_cli_train_then_evaluate(tmp_path, capsys, recursion):
    out = tmp_path / "run"
    assert cli.main(["train", "--output-dir", str(out), "--max-steps", "2", *TINY, *recursion]) == 0
    assert not (out / "samples.png").exists()  # no class grid for an image-conditioned model
    capsys.readouterr()
    result = tmp_path / "eval.json"
    argv = ["evaluate", "--benchmark", "frozenlake", "--checkpoint", str(out), "--num-maps", "2", "--num-steps", "2",
            "--output", str(result), "--threads", "1", "--no-progress"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads(result.read_text())
    assert sorted(printed) == sorted(saved["sizes"]) == ["4", "5"]
    for rates in saved["sizes"].values():
        assert rates["num_maps"] == 2
        assert np.isclose(sum(rates[f"{o}_rate"] for o in fl.OUTCOMES), 1.0)
        assert (rates["mean_recursion_steps"] is None) == bool(recursion)


def test_recursion_step_figure(tmp_path):
    from thinking_pixel.recursion import RecursionConfig, ThinkingPixelDiT
    from thinking_pixel.tasks.frozenlake import figures

    lake = ("SFFF", "FHFH", "FFFH", "HFFG")
    here, right = fl.render(lake, (0, 0), canvas=5), fl.render(lake, (0, 1), canvas=5)
    assert figures.describe_move(here, right) == "right"
    assert figures.describe_move(here, here) == "no move"
    assert figures.describe_move(here, fl.render(lake, (2, 2), canvas=5)) == "jump"
    evaluation = {"sizes": {"4": {"episodes": [
        dict(map=lake, outcome="success", actions=[1, 1, 2, 1, 2, 2], moves=6, optimal=6),
        dict(map=lake, outcome="hole", actions=[2, 1], moves=2, optimal=6),
        dict(map=lake, outcome="invalid", actions=[1], moves=1, optimal=6)]}}}
    chosen = figures.failure_frames(evaluation, "4", 3, canvas=5)
    assert [c.split(" ")[0] for c, _ in chosen] == ["hole", "invalid", "success"]
    assert fl.parse_frame(chosen[0][1])[1] == [(0, 1)]  # the frame before stepping into the hole
    assert fl.parse_frame(chosen[1][1])[1] == [(1, 0)]  # the frame before the invalid move

    model = ThinkingPixelDiT(dit_config("DiT-N/4", input_size=20, in_channels=3, num_classes=1, cond_channels=3,
                                        depth=2, hidden_size=32, num_heads=2), RecursionConfig(steps=3, rank=4)).eval()
    frames = [f for _, f in chosen]
    pred = figures.recursion_step_predictions(model, frames, num_steps=3, probe_steps=(0, 2))
    assert pred["decoded"].shape == (2, 3, 3, 3, 20, 20) and pred["samples"].shape == (3, 3, 20, 20)
    figures.plot_recursion_steps([c for c, _ in chosen], frames, pred, tmp_path / "f.png", "test")
    assert (tmp_path / "f.png").stat().st_size > 0
