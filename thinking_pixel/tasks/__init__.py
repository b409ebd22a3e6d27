"""Task suites built on the models: each folder holds one task's data, renderer, scorer and planners."""
