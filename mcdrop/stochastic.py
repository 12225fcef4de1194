"""Deprecated alias: the stochastic policy now lives in :mod:`mcdrop.policy`.

``mcdrop.stochastic`` held the whole policy before 0.2; its public names are re-exported here (and
from :mod:`mcdrop` itself, which is where to import them from), and the forward-pre-hooks of
``add_dropout`` from earlier versions stay importable under their old names, so models saved with
them (``torch.save(model)``) still load.
"""

from mcdrop.policy.activate import StochasticPolicy, describe, enable_dropout
from mcdrop.policy.classify import (
    SITE_KINDS,
    StochasticSite,
    find_stochastic_sites,
    register_deterministic,
    register_stochastic,
)
from mcdrop.policy.edit import (
    ADDED_DROPOUT_NAME,
    RateChange,
    add_dropout,
    added_dropout_hook,
    dropout_before_hook,
    set_dropout_rate,
)

# Models pickled by earlier versions refer to their add_dropout hooks by these names.
_added_dropout_hook = added_dropout_hook
_dropout_before_hook = dropout_before_hook

__all__ = [
    "StochasticSite",
    "StochasticPolicy",
    "enable_dropout",
    "find_stochastic_sites",
    "register_stochastic",
    "register_deterministic",
    "describe",
    "add_dropout",
    "set_dropout_rate",
    "RateChange",
    "SITE_KINDS",
    "ADDED_DROPOUT_NAME",
]

