"""Tasks: synthetic worlds with programmatic evaluators, one folder each (data, renderer, scorer, planners):
``compositional`` (GenEval-style shape scenes), ``frozenlake`` (visual planning)."""
