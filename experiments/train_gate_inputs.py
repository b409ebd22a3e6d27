"""``thinking-pixel train`` with a chosen gate input set (the Fig. 4 gate-input ablation).

    python experiments/train_gate_inputs.py --gate-inputs tokens [any thinking-pixel train options]

TrainConfig has no gate_inputs field yet, so this wraps it: the same options, the same training loop, and a
``gate_inputs`` entry in the run's train_config.json (resuming checks it like every other setting).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from thinking_pixel.cli import build_parser
from thinking_pixel.models import GATE_INPUTS, RecursionConfig
from thinking_pixel.train import TrainConfig, train


@dataclass
class GateInputsTrainConfig(TrainConfig):
    gate_inputs: tuple = GATE_INPUTS

    def __post_init__(self):
        super().__post_init__()
        self.gate_inputs = tuple(self.gate_inputs)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "gate_inputs": list(self.gate_inputs)}

    def recursion_config(self) -> RecursionConfig | None:
        base = super().recursion_config()
        return None if base is None else dataclasses.replace(base, gate_inputs=self.gate_inputs)


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--gate-inputs", required=True,
                     help=f"comma-separated subset of {','.join(GATE_INPUTS)}, e.g. tokens")
    known, rest = pre.parse_known_args(argv)
    args = build_parser().parse_args(["train", *rest])
    options = {k: v for k, v in vars(args).items() if k != "command"}
    config = GateInputsTrainConfig(**options, gate_inputs=tuple(known.gate_inputs.split(",")))
    if not config.recursion:
        raise SystemExit("--gate-inputs needs a recursive model (drop --no-recursion)")
    config.recursion_config()  # validates the gate inputs before any work
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
