"""One abstract run of a Linen model under the recording interceptor: the modules it meets, their
layouts and its output heads, and why a targeted weight cannot be adapted."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from .._config import LoraConfig
from ._intercept import Recorder, Seen
from ._layer_kind import LayerKind, Unsupported
from ._layers import SUPPORTED

_TRACES = itertools.count()


def unused_reason(path: str, seen: dict[str, Seen]) -> str | None:
    """Why the weight at ``path`` cannot be adapted, given the modules met; None if it can be.

    A weight whose module never ran has no reason against it (``method=`` may run part of a
    model).
    """
    owner, _, name = path.rpartition("/")
    module = seen.get(owner)
    if module is None:
        return None
    where = f"the module at '{owner}'" if owner else "the root module"
    if module.kind is None:
        return (
            f"{where} is a {module.kind_name}, which jlora.linen cannot adapt; it adapts "
            f"{SUPPORTED}. Exclude this path or narrow the targets"
        )
    if name != module.kind.param:
        return (
            f"{where} is an {module.kind.name}, whose only adaptable weight is "
            f"{module.kind.param!r}, not {name!r}. Narrow the targets to '.*/{module.kind.param}'"
        )
    if isinstance(module.layout, Unsupported):
        return str(module.layout)
    if module.layout is None:
        return (
            f"{where} ({module.kind.name}) ran, but not through "
            f"{' or '.join(module.kind.methods)}: the model reads its {name!r} directly (or a "
            "subclass overrides the method without calling super()), which jlora cannot see. Call "
            "the module instead (e.g. embed.attend(x) for a tied head), or exclude this path"
        )
    return None


@dataclasses.dataclass
class Trace:
    """What one abstract run of a model met: its modules, and the layers whose output is (part
    of) the model's output: its output heads."""

    seen: dict[str, Seen]
    heads: set[str]


def trace(
    model: nn.Module,
    params: Any,
    args: tuple,
    kwargs: dict,
    variables: dict[str, Any],
    rngs: Any,
    method: Any,
    config: LoraConfig | None = None,
    custom: tuple[tuple[type, LayerKind], ...] = (),
) -> Trace:
    """Runs ``model.apply`` abstractly (``jax.eval_shape``) and returns the modules it met.

    Array inputs (and ``jax.ShapeDtypeStruct``) are traced; every other input (flags such as
    ``train=True``) stays a Python value, so the model takes the same branches as in a real call.
    """
    recorder = Recorder(config, custom)
    heads: set[str] = set()
    flat, treedef = jax.tree.flatten((args, kwargs))
    array_types = (jax.Array, np.ndarray, jax.ShapeDtypeStruct)
    arrays = [i for i, x in enumerate(flat) if isinstance(x, array_types)]

    def run(params, variables, leaves):
        full = list(flat)
        for i, leaf in zip(arrays, leaves, strict=True):
            full[i] = leaf
        call_args, call_kwargs = jax.tree.unflatten(treedef, full)
        with nn.intercept_methods(recorder):
            out, _ = model.apply(
                {"params": params, **variables},
                *call_args,
                rngs=rngs,
                # Other collections may change (batch norm in train mode); params may not, so a
                # model never silently creates a weight that is missing from params.
                mutable=nn.DenyList("params"),
                method=method,
                **call_kwargs,
            )
        heads.update(
            recorder.outputs[id(y)][0] for y in jax.tree.leaves(out) if id(y) in recorder.outputs
        )
        return out

    # A collection no other trace has: Flax's nn.jit caches a traced method by its inputs'
    # structure and would skip the Python body (and with it the recorder) on a second trace.
    variables = {**variables, f"jlora_trace_{next(_TRACES)}": {"nonce": np.zeros((), np.int8)}}
    jax.eval_shape(run, params, variables, [flat[i] for i in arrays])
    return Trace(recorder.seen, heads)
