"""Argument checks: type predicates for constructor/config arguments (bool is an int in Python; these say no) and
a positive-count check that names the argument."""


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_ints(**values) -> None:
    """Raise ValueError naming the first of ``values`` (name=value) that is not an int >= 1."""
    for name, value in values.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
