"""The TAU 2020 Mobile import path of earlier releases: the code lives in :mod:`l2bn.data.tau2020`.

``extract_features`` is the old name of :func:`~l2bn.data.tau2020.logmel_features` (renamed apart from
:func:`l2bn.metrics.extract_features`, the classifier's input features).
"""
from .tau2020 import *  # noqa: F401,F403  (its public names)
from .tau2020 import __all__ as _names
from .tau2020 import logmel_features as extract_features

__all__ = [*_names, "extract_features"]
