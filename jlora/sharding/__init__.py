"""Shardings for adapter factors, derived from the base weights' shardings.

A weight ``W0: (*stack, *fan_in, *fan_out)`` sharded by ``PartitionSpec(*s, *i, *o)`` gives (for
a weight whose axes come in another order, e.g. layout ``"oio"``, each entry goes with its axis)

    a: (*stack, *fan_in, r)   ->  PartitionSpec(*s, *i, None)
    b: (*stack, r, *fan_out)  ->  PartitionSpec(*s, None, *o)

so ``x a`` contracts ``a`` exactly as ``x W0`` contracts ``W0`` (same collectives on the same mesh
axes), ``(x a) b`` produces outputs laid out like ``x W0``'s, and the rank axis, which is tiny, is
replicated. Stack axes (scanned layers, experts) follow the base. Nothing here gathers or
replicates a base weight: ``init`` creates each factor directly on its sharding.

A trainable extra (:class:`jlora.Trainable`, a fully trained copy of a base leaf) takes its base
leaf's sharding unchanged.

Factor shardings built some other way (logical-axis rules, a checkpoint's metadata) can be checked
with :func:`check_factor_shardings`: the rank axis must stay replicated, since every device needs
the whole rank-``r`` intermediate ``x a``. Factors boxed with logical names (Linen models built
with ``nn.with_logical_partitioning``) get theirs from the user's ``logical_axis_rules`` through
:func:`logical_factor_shardings`, which checks the names, the rules and the mesh on the way.

Explicit sharding (``AxisType.Explicit`` meshes, ``jax.set_mesh``) needs nothing more here: the
shardings are the same NamedShardings, and ``init`` creates the factors on them, typed.
"""

from .._factors import RANK_AXIS as RANK_AXIS
from . import _checks
from ._checks import check_factor_shardings as check_factor_shardings
from ._init import init as init
from ._logical import logical_factor_shardings as logical_factor_shardings
from ._specs import factor_shardings as factor_shardings
from ._specs import factor_specs as factor_specs

__all__ = [
    "RANK_AXIS",
    "check_factor_shardings",
    "factor_shardings",
    "factor_specs",
    "init",
    "logical_factor_shardings",
]

# Not public (not in __all__): jlora.checkpoint imports it from here to check restore shardings.
check_divides = _checks.check_divides
