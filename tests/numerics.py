"""Tolerances for float32 results of different compiled programs, scaled to what was summed.

XLA promises no bit equality between programs of different shapes, shardings, fusions or CPUs:
jit vs eager, sharded vs unsharded, a hand VJP vs autodiff may sum in another order (XLA:CPU's dot
kernels pick their order by output width and vector unit). Every order of a float32 sum of ``K``
products lies within ``K u sum_k |x_k y_k|`` of the exact sum (Higham, *Accuracy and Stability of
Numerical Algorithms*, 3.1; ``u = EPS32 / 2``). So a result is checked against a float64
reference (or another float32 result) with a tolerance built from the float64 *magnitude* behind
each element, ``sum_k |x_k y_k|``, which stays small where the result cancels while a bug (a
missing scale, a transposed factor, a lost reduction) moves the result by the size of its terms.
"""

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23, twice float32's unit round-off


def f64(x) -> np.ndarray:
    """``x`` as a float64 NumPy array."""
    return np.asarray(x, np.float64)


def abs_chain(*factors) -> np.ndarray:
    """``|f1| @ |f2| @ ...`` in float64: the magnitude behind each element of ``f1 @ f2 @ ...``.

    A product of products keeps this bound, with the inner and outer sum lengths added in
    ``terms``; scalars (a LoRA ``scale``) may be given as 0-d factors.
    """
    out = np.abs(f64(factors[0]))
    for f in factors[1:]:
        f = np.abs(f64(f))
        out = out * f if out.ndim == 0 or f.ndim == 0 else out @ f
    return out


def delta_reference(f, *, absolute: bool = False) -> np.ndarray:
    """``scale * a @ b`` of ``LoraFactors`` in float64, shaped like the weight, for any layout.

    With ``absolute``, ``|scale| |a| @ |b|``: the magnitude behind each element of the delta.
    """
    a, b = f64(f.a), f64(f.b)
    scale = f.scale
    if absolute:
        a, b, scale = np.abs(a), np.abs(b), abs(scale)
    n_stack = a.ndim - 1 - f.layout.fan_in_ndim
    stack, fan_in, fan_out = a.shape[:n_stack], a.shape[n_stack:-1], b.shape[n_stack + 1 :]
    d = np.matmul(a.reshape(*stack, -1, a.shape[-1]), b.reshape(*stack, b.shape[n_stack], -1))
    return scale * d.reshape(*stack, *fan_in, *fan_out)


def assert_merge_within_roundoff(merged, w, f, *, err_msg: str = "") -> None:
    """A float32 merged weight against ``W0 + scale * a @ b`` in float64.

    Magnitude ``|W0| + |scale| |a| @ |b|``; roundings: the rank-long sum, the scale, the add.
    """
    want = f64(w) + delta_reference(f)
    magnitude = np.abs(f64(w)) + delta_reference(f, absolute=True)
    assert_within_roundoff(merged, want, magnitude, terms=f.rank + 2, err_msg=err_msg)


def assert_within_roundoff(got, want, magnitude, *, terms: int, err_msg: str = "") -> None:
    """Asserts ``|got - want| <= terms * EPS32 * magnitude`` element by element.

    Args:
        got: a float32 result.
        want: its float64 reference, or another float32 result of the same maths (then count the
            roundings of both in ``terms``).
        magnitude: float64, broadcastable to ``want``: per element the sum of the absolute values
            of everything summed into it (``abs_chain``; ``|w| + |delta|`` for a merged weight).
        terms: the float32 roundings on the longest path to an element: the length of each sum
            it went through plus one per further operation. ``EPS32 = 2u`` leaves a factor 2.
        err_msg: prefixed to the failure message (a parameter path).
    """
    bound = terms * EPS32 * np.broadcast_to(f64(magnitude), np.shape(want))
    _assert_within(got, want, bound, f"{terms} x EPS32 x magnitude", err_msg)


def assert_same_adam_trajectory(got, want, start, *, lr: float, steps: int, err_msg="") -> None:
    """Two programs' parameters after ``steps`` Adam steps from ``start`` agree to round-off.

    Adam divides each gradient element by its own running RMS, so where a gradient element cancels
    to near zero, a last-bit difference in it becomes a larger relative difference of its update.
    An update is at most about ``lr``, so ``1e-3 lr`` per step is allowed for that, plus a few
    roundings per step of the parameter's own magnitude. A bug (a lost reduction, a wrong shard,
    a wrong learning rate) moves updates by about ``lr``: a thousand times more. (Momentum SGD
    does not amplify at all, so the bound holds for it a fortiori.)
    """
    magnitude = np.abs(f64(start)) + np.abs(f64(want))
    bound = 4 * steps * EPS32 * magnitude + 1e-3 * lr * steps
    _assert_within(got, want, bound, f"{steps} Adam steps' round-off", err_msg)


def _assert_within(got, want, bound, what: str, err_msg: str) -> None:
    got, want = f64(got), f64(want)
    assert got.shape == want.shape, f"{err_msg}: shape {got.shape} != {want.shape}"
    error = np.abs(got - want)
    bad = ~(error <= bound)  # NaN counts as bad
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, error - bound, -np.inf)), want.shape)
        raise AssertionError(
            f"{err_msg}: {int(bad.sum())} of {bad.size} elements beyond {what}; worst at "
            f"{tuple(int(i) for i in worst)}: got {got[worst]!r}, want {want[worst]!r}, error "
            f"{error[worst]:.3g} > bound {bound[worst]:.3g}"
        )
