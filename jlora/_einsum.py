"""LoRA for any einsum layer: the roles of its kernel's letters, and its factored term.

An einsum layer computes ``y = einsum('<lhs>,<kernel>-><out>', x, W0)``. Each kernel letter is

* *contracted* (``i``, fan-in): in the input, not the output (``D`` in ``'BTD,NDH->BTNH'``);
* *produced* (``o``, fan-out): in the output, not the input (``N`` and ``H`` there);
* *shared* (``s``): in the input and the output, like a batch axis (a per-head or per-expert
  kernel, ``N`` in ``'BTNH,NHK->BTNK'``): one adapter per index, a stack axis of the factors.

so Gemma's query kernel ``(heads, d_model, head_dim)`` has roles ``"oio"``, its stacked key/value
kernel ``'BTD,CKDH->CBTKH'`` has ``"ooio"``. The factors follow :mod:`jlora._layout`:
``a: (*s, *i, r)`` and ``b: (*s, r, *o)``, each group in kernel order, and the term is

    xa = einsum('<lhs>,<s i r>-><mid>', drop(x), a)        y = scale * einsum('<mid>,<s r o>-><out>', xa, b)

where ``mid`` keeps the input letters the output or ``b`` still needs, plus ``r``: the
``O(fan_in * fan_out)`` update is never formed. Roles may be *chosen* other than the natural ones
(through ``LoraConfig.layouts``): a shared letter may be folded into fan-in or fan-out (one adapter
across heads), and any letter may become a stack axis (one adapter per index, e.g. separate key
and value adapters for ``C``), so long as some letter stays fan-in and some fan-out.
"""

from __future__ import annotations

import dataclasses
import string

import jax
import jax.numpy as jnp

from ._layout import Layout


class EinsumUnsupported(ValueError):
    """An einsum whose kernel has no LoRA factorisation (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Equation:
    """A parsed einsum layer equation and its kernel letters' natural roles."""

    text: str
    lhs: str
    kernel: str
    out: str
    roles: str  # one of 's', 'i', 'o' per kernel letter, in kernel order

    @property
    def layout(self) -> Layout:
        """The natural layout of the kernel (leading shared letters become plain stack axes)."""
        return Layout.parse(self.roles)


def parse(equation: str) -> Equation:
    """Reads ``'<lhs>,<kernel>-><out>'`` and classifies the kernel's letters.

    Raises:
        EinsumUnsupported: the kernel has an ellipsis or a repeated letter, sums a letter away,
            or has no contracted or no produced letter.

    Example:
        >>> parse("BTD,NDH->BTNH").roles
        'oio'
        >>> parse("BTNH,NHK->BTNK").roles
        'sio'
    """
    text = equation.replace(" ", "")
    operands, arrow, out = text.partition("->")
    lhs, comma, kernel = operands.partition(",")
    if not arrow or not comma or "," in kernel:
        raise EinsumUnsupported(
            f"einsum {equation!r} is not of the form '<input>,<kernel>-><output>' (one input, "
            "one kernel, an explicit output)"
        )
    if "." in kernel:
        raise EinsumUnsupported(f"einsum {equation!r}: its kernel operand has an ellipsis")
    if len(set(kernel)) != len(kernel):
        raise EinsumUnsupported(f"einsum {equation!r}: its kernel {kernel!r} repeats a letter")
    roles = "".join(
        ("s" if c in out else "i") if c in lhs else ("o" if c in out else "?") for c in kernel
    )
    if "?" in roles:
        raise EinsumUnsupported(
            f"einsum {equation!r}: kernel letter(s) "
            f"{[c for c, r in zip(kernel, roles, strict=True) if r == '?']} are summed away (in "
            "neither the input nor the output)"
        )
    if "i" not in roles or "o" not in roles:
        raise EinsumUnsupported(
            f"einsum {equation!r}: its kernel letters {kernel!r} are {roles!r} (s shared, i "
            "contracted, o produced); a LoRA update needs at least one contracted letter (in the "
            "input only) and one produced letter (in the output only)"
        )
    return Equation(text, lhs, kernel, out, roles)


def check_roles(eq: Equation, chosen: str) -> str | None:
    """Why ``chosen`` roles cannot replace the kernel's natural ones, or None if they can.

    A shared letter may become fan-in, fan-out or stay a stack axis; any letter may become a stack
    axis; some letter must stay fan-in and some fan-out.
    """
    if len(chosen) != len(eq.kernel):
        return (
            f"the layout has {len(chosen)} axes for the kernel's {len(eq.kernel)} letters "
            f"{eq.kernel!r}"
        )
    for c, natural, new in zip(eq.kernel, eq.roles, chosen, strict=True):
        if new != natural and new != "s" and natural != "s":
            return (
                f"kernel letter {c!r} is {'contracted' if natural == 'i' else 'produced'} "
                f"({natural!r}) in {eq.text!r}, so it cannot be {new!r}"
            )
    if "i" not in chosen or "o" not in chosen:
        return f"layout {chosen!r} leaves no fan-in ('i') or no fan-out ('o') axis"
    return None


def layout_for(eq: Equation, chosen: Layout | None) -> Layout:
    """The kernel's layout: ``chosen`` (from the config) if its roles fit, else the natural one.

    Raises:
        EinsumUnsupported: ``chosen`` does not fit the equation.
    """
    if chosen is None:
        return eq.layout
    roles = chosen.roles(len(eq.kernel))
    reason = check_roles(eq, roles)
    if reason is not None or chosen.embedding:
        raise EinsumUnsupported(
            f"einsum {eq.text!r} (natural roles {eq.roles!r}) cannot take the layout {roles!r} "
            f"from LoraConfig.layouts: {reason or 'an einsum kernel is not an embedding table'}. "
            f"Shared letters may become 'i', 'o' or stay 's'; any letter may become 's'"
        )
    return chosen


def term(
    eq: Equation, layout: Layout, x: jax.Array, a: jax.Array, b: jax.Array, scale: float
) -> jax.Array:
    """``scale * einsum(x, a @ b)`` in factored form, for one layer's factors (no scan stack).

    Args:
        eq: the layer's equation.
        layout: the factors' layout; its roles for the kernel letters must pass
            :func:`check_roles`.
        x: the layer input (after dropout), in the dtype of the output.
        a: ``(*s, *i, r)``; ``b``: ``(*s, r, *o)``, groups in kernel order.
        scale: the adapter's scale, applied on the rank-``r`` intermediate.
    """
    roles = layout.roles(len(eq.kernel))
    letters = {
        role: "".join(c for c, g in zip(eq.kernel, roles, strict=True) if g == role)
        for role in "sio"
    }
    r = next(c for c in string.ascii_letters if c not in eq.text)
    b_letters = letters["s"] + r + letters["o"]
    lhs_letters = eq.lhs.replace(".", "")
    kept = "".join(
        dict.fromkeys(c for c in lhs_letters if c in eq.out or c in b_letters)
    ) + "".join(c for c in letters["s"] if c not in lhs_letters)
    mid = ("..." if "..." in eq.lhs else "") + kept + r
    xa = jnp.einsum(f"{eq.lhs},{letters['s']}{letters['i']}{r}->{mid}", x, a.astype(x.dtype))
    xa = xa * jnp.asarray(scale, xa.dtype)
    return jnp.einsum(f"{mid},{b_letters}->{eq.out}", xa, b.astype(x.dtype))
