"""A compositional shapes world with a GenEval-style programmatic evaluator.

- :mod:`.grammar`: the vocabulary (6 shapes, 6 colours, 4 relations), GenEval's caption templates and rules,
  :func:`make_prompts`, the held-out split.
- :mod:`.render`: :func:`render` a prompt as an RGB image that satisfies it, at any resolution.
- :mod:`.detect`: a classical-vision detector (colour components, template fits).
- :mod:`.score`: :func:`score` images against prompts with GenEval's rules.
"""

from .detect import Detection, detect_objects
from .grammar import (COLOUR_NAMES, RELATIONS, SHAPE_NAMES, TAGS, HeldOut, Prompt, Rule, all_prompts,
                      make_prompts)
from .render import SceneObject, render, render_scene, sample_scene
from .score import evaluate_image, relative_position, score

__all__ = ["COLOUR_NAMES", "Detection", "HeldOut", "Prompt", "RELATIONS", "Rule", "SHAPE_NAMES", "SceneObject",
           "TAGS", "all_prompts", "detect_objects", "evaluate_image", "make_prompts", "relative_position", "render",
           "render_scene", "sample_scene", "score"]
