"""The shapes the suite runs: the paper's settings in a full run, small ones under ``--quick``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LoraShape:
    """A routed-LoRA problem: ``batch * seq`` tokens of width ``d`` through ``experts`` rank-``rank`` LoRAs."""

    label: str
    batch: int
    seq: int
    d: int
    rank: int
    experts: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def key(self) -> str:
        return f"T={self.tokens} D={self.d} R={self.rank} E={self.experts}"

    def as_dict(self) -> dict:
        return {"label": self.label, "batch": self.batch, "seq": self.seq, "tokens": self.tokens,
                "d": self.d, "rank": self.rank, "experts": self.experts}


@dataclass(frozen=True)
class GateShape:
    label: str
    tokens: int
    experts: int

    @property
    def key(self) -> str:
        return f"T={self.tokens} E={self.experts}"

    def as_dict(self) -> dict:
        return {"label": self.label, "tokens": self.tokens, "experts": self.experts}


LORA_FULL = (
    LoraShape("DiT-XL/2 layer, batch 32", 32, 256, 1152, 128, 5),  # the paper's rank and M
    LoraShape("DiT-S/2 layer, batch 32", 32, 256, 384, 32, 5),
    LoraShape("T2048 R16 E8", 8, 256, 1152, 16, 8),
)
LORA_QUICK = (
    LoraShape("quick M=5", 4, 64, 128, 16, 5),
    LoraShape("quick M=8", 2, 64, 96, 8, 8),
)
GATE_FULL = (
    GateShape("DiT-XL/2 layer, batch 32", 8192, 5),
    GateShape("T2048 E8", 2048, 8),
)
GATE_QUICK = (GateShape("quick", 1024, 5),)


def lora_shapes(quick: bool):
    return LORA_QUICK if quick else LORA_FULL


def gate_shapes(quick: bool):
    return GATE_QUICK if quick else GATE_FULL
