"""The grid report's import path of earlier releases: the code lives in :mod:`l2bn.train.report`."""
from .train.report import *  # noqa: F401,F403  (its public names)
from .train.report import __all__  # noqa: F401
