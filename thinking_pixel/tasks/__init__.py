"""Tasks: synthetic worlds with programmatic evaluators (``compositional``: GenEval-style shape scenes)."""
