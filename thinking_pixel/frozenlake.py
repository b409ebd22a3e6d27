"""``thinking_pixel.frozenlake``: the FrozenLake visual-planning task (see :mod:`thinking_pixel.tasks.frozenlake`)."""

from .tasks.frozenlake import *  # noqa: F401,F403
from .tasks.frozenlake import __all__  # noqa: F401
