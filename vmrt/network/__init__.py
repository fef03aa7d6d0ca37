"""Container networking (being cut into a package: issue 15, part 5)."""

from .attach import *  # noqa: F403
from .attach import _nf  # noqa: F401
