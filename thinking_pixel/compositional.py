"""``thinking_pixel.compositional``: the compositional shapes world and its GenEval-style evaluator.

A re-export of :mod:`thinking_pixel.tasks.compositional` (where the code lives), so that

    from thinking_pixel.compositional import make_prompts, render, score
    prompts = make_prompts(4, seed=0)                    # 4 prompts per GenEval tag
    images = [render(p, size=32, seed=i) for i, p in enumerate(prompts)]
    score(images, prompts)                               # {"single_object": 1.0, ..., "overall": 1.0, ...}

The training data is ``thinking_pixel.data.CompositionalDataset`` (``--dataset compositional``):
``ds[i] -> (image (3, H, W) in [-1, 1], label)``, the caption is ``ds.class_names[label]`` and its rules
``ds.prompts[label]``; ``split="train"`` never shows the held-out compositions, ``split="test"`` shows only them
(``make_prompts(n, seed=s, split="test")`` gives held-out prompts to generate from and :func:`score`).
"""

from .tasks.compositional import *  # noqa: F401,F403
from .tasks.compositional import __all__  # noqa: F401
