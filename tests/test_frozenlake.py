"""thinking_pixel.tasks.frozenlake: maps, dynamics (against gymnasium's FrozenLake-v1), frames, action decoding,
the oracle and the rollout scorer."""

import numpy as np
import pytest
from PIL import Image

from thinking_pixel.tasks import frozenlake as fl

gym = pytest.importorskip("gymnasium")
from gymnasium.envs.toy_text.frozen_lake import is_valid  # noqa: E402


def _env(lake):
    return gym.make("FrozenLake-v1", desc=list(lake), is_slippery=False)


def test_make_maps_distinct_solvable_reproducible():
    for size in (3, 4, 6):
        maps = fl.make_maps(30, size=size, seed=1)
        assert len(set(maps)) == 30
        assert all(len(m) == size and m[0][0] == "S" and m[-1][-1] == "G" for m in maps)
        assert all(is_valid([list(row) for row in m], size) for m in maps)  # gymnasium's own solvability check
        assert maps == fl.make_maps(30, size=size, seed=1)
    assert fl.make_maps(30, size=4, seed=2) != fl.make_maps(30, size=4, seed=1)
    train = fl.make_maps(50, size=4, seed=0)
    held_out = fl.make_maps(50, size=4, seed=0, exclude=train)
    assert not set(train) & set(held_out)


@pytest.mark.parametrize("bad, match", [(dict(n=-1), "n must"), (dict(size=1), "size must"), (dict(p=0), "p must")])
def test_make_maps_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        fl.make_maps(**{"n": 2, "size": 4, "seed": 0, **bad})


def test_dynamics_match_gymnasium():
    rng = np.random.default_rng(0)
    maps = fl.make_maps(6, size=4, seed=3) + fl.make_maps(4, size=7, seed=3, p=0.7)
    for lake in maps:
        env = _env(lake)
        for episode in range(3):
            obs, _ = env.reset(seed=episode)
            pos = (0, 0)
            assert obs == pos[0] * len(lake) + pos[1]
            for _ in range(40):
                action = int(rng.integers(4))
                obs, reward, terminated, _, _ = env.step(action)
                new_pos, done, our_reward = fl.step(lake, pos, action)
                assert obs == new_pos[0] * len(lake) + new_pos[1]
                assert (done, our_reward) == (terminated, reward)
                # the frames of the move decode to the action, or to None when the agent bumped the border
                decoded = fl.decode_action(fl.render(lake, pos), fl.render(lake, new_pos))
                assert decoded == (action if new_pos != pos else None)
                pos = new_pos
                if done:
                    break


def test_oracle_follows_a_shortest_path_in_gymnasium():
    for lake in fl.make_maps(10, size=5, seed=4):
        env = _env(lake)
        obs, _ = env.reset(seed=0)
        frame = fl.render(lake, (0, 0), canvas=7)
        for moves in range(1, 26):
            nxt = fl.oracle_planner(frame)
            assert nxt.size == frame.size
            assert nxt.size == fl.oracle_planner(frame, map=lake).size
            action = fl.decode_action(frame, nxt)
            assert action is not None
            obs, reward, terminated, _, _ = env.step(action)
            frame = nxt
            if terminated:
                break
        assert reward == 1.0 and moves == fl.shortest_path_length(lake)


def test_render_size_and_parse_round_trip():
    lake = ("SFH", "FFF", "HFG")
    image = fl.render(lake, (1, 2), cell=4, canvas=5)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (20, 20)
    assert fl.parse_frame(image) == (lake, [(1, 2)])
    # small noise (as in a generated frame) reads back the same
    noisy = np.asarray(image).astype(int) + np.random.default_rng(0).integers(-60, 61, (20, 20, 3))
    assert fl.parse_frame(np.clip(noisy, 0, 255).astype(np.uint8)) == (lake, [(1, 2)])
    with pytest.raises(ValueError, match="canvas"):
        fl.render(lake, (0, 0), canvas=2)
    with pytest.raises(ValueError, match="pos"):
        fl.render(lake, (3, 0))
    with pytest.raises(ValueError, match="map must"):
        fl.render(("SF", "FF"), (0, 0))
    # the agent's colour names the tile under it, on every tile kind
    for pos, tile in (((0, 0), "S"), ((0, 1), "F"), ((0, 2), "H"), ((2, 2), "G")):
        assert fl.parse_frame(fl.render(lake, pos)) == (lake, [pos]) and lake[pos[0]][pos[1]] == tile


def test_decode_action_rejects_everything_but_one_legal_move():
    lake = ("SFFF", "FHFH", "FFFH", "HFFG")
    here = fl.render(lake, (2, 1))
    assert [fl.decode_action(here, fl.render(lake, p)) for p in ((2, 0), (3, 1), (2, 2), (1, 1))] == [0, 1, 2, 3]
    assert fl.decode_action(here, fl.render(lake, (3, 2))) is None  # diagonal
    assert fl.decode_action(here, fl.render(lake, (0, 3))) is None  # teleport
    assert fl.decode_action(here, here) is None  # no move
    changed = ("SFFF", "FHFH", "FFFF", "HFFG")
    assert fl.decode_action(here, fl.render(changed, (2, 2))) is None  # the map changed
    two = np.asarray(fl.render(lake, (2, 2))).copy()
    two[:4, :4] = fl.PALETTE["agent on S"]  # a second agent in the top-left cell
    assert fl.decode_action(here, two) is None
    assert fl.decode_action(here, np.zeros((16, 16, 3), np.uint8)) is None  # no lake at all
    assert [fl.invalid_reason(here, b) for b in (fl.render(lake, (3, 2)), fl.render(lake, (0, 3)), here,
                                                 fl.render(changed, (2, 2)), two)] == \
        ["diagonal", "jump", "no move", "map changed", "2 agent cells"]
    assert fl.invalid_reason(here, fl.render(lake, (2, 0))) is None


def test_evaluate_planner_outcomes():
    maps = fl.make_maps(8, size=4, seed=5)
    oracle = fl.evaluate_planner(fl.oracle_planner, maps)
    assert oracle["success_rate"] == 1.0 and oracle["path_ratio"] == 1.0 and oracle["num_maps"] == 8
    assert [e["moves"] for e in oracle["episodes"]] == [fl.shortest_path_length(m) for m in maps]

    assert oracle["cell_accuracy"] == oracle["first_cell_accuracy"] == 1.0
    stay = fl.evaluate_planner(lambda frame: frame, maps)
    assert stay["invalid_rate"] == 1.0 and stay["path_ratio"] is None
    assert stay["cell_accuracy"] == 14 / 16  # all but the agent's old and new cells
    assert stay["invalid_reasons"] == {"no move": 8}

    def into_hole(frame):  # step onto a neighbouring hole when there is one, else back and forth
        lake, (pos,) = fl.parse_frame(frame)
        moves = [fl.step(lake, pos, a)[0] for a in range(4)]
        holes = [p for p in moves if lake[p[0]][p[1]] == "H"]
        safe = [p for p in moves if p != pos and lake[p[0]][p[1]] == "F"] + [p for p in moves if p != pos]
        return fl.render(lake, (holes or safe)[0])

    hole_maps = [m for m in maps if "H" in m[0] + m[1][0]]
    assert hole_maps
    result = fl.evaluate_planner(into_hole, hole_maps)
    assert result["hole_rate"] == 1.0

    class Batched:
        batched = True
        calls = 0

        def __call__(self, frames):
            self.calls += 1
            return [fl.oracle_planner(f) for f in frames]

    planner = Batched()
    assert fl.evaluate_planner(planner, maps, max_steps=2)["timeout_rate"] == np.mean(
        [fl.shortest_path_length(m) > 2 for m in maps])
    assert planner.calls == 2
    with pytest.raises(ValueError, match="max_steps"):
        fl.evaluate_planner(fl.oracle_planner, maps, max_steps=0)
