"""GaLore's step against Adam's, and what its projector refresh (an SVD per leaf) costs.

``python benchmarks/galore.py`` times (pinned to one core, CPU time, interleaved rounds, medians;
see ``timing.py``) ``--chunk`` steps of a digits-sized MLP (64-H-H-10, batch 64) inside one
``lax.scan``, as ``examples/variants.py`` trains, for:

* ``Adam``: ``optax.adam``;
* ``GaLore r, T=chunk/2``: ``jlora.variants.galore(optax.adam, r, update_proj_gap=chunk // 2)``,
  two refreshes per chunk (the experiment refreshes every ``steps // 20`` steps);
* ``GaLore r, T=1``: an SVD per projected leaf every step;
* ``GaLore r, T=never``: one refresh at step 0 of the state, none while timed.

If ``lax.cond`` ran both branches every step, ``T=chunk/2`` and ``T=never`` would cost what
``T=1`` costs. Ratios are to Adam in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from timing import JaxCase, run_rounds  # noqa: E402

import jlora.variants as jv  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mlp_params(key: jax.Array, hidden: int) -> dict:
    sizes = [(64, hidden), (hidden, hidden), (hidden, 10)]
    keys = jax.random.split(key, len(sizes))
    return {
        f"l{i}": {"w": jax.random.normal(k, s) / s[0] ** 0.5, "b": jnp.zeros(s[1])}
        for i, (k, s) in enumerate(zip(keys, sizes, strict=True))
    }


def loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    for i in range(3):
        h = h @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"]
        h = jnp.tanh(h) if i < 2 else h
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def case(name: str, tx: optax.GradientTransformation, params: dict, chunk: int) -> JaxCase:
    def run(params, opt_state, key):
        def step(carry, k):
            params, opt_state = carry
            kx, ky = jax.random.split(k)
            x, y = jax.random.normal(kx, (64, 64)), jax.random.randint(ky, (64,), 0, 10)
            value, grads = jax.value_and_grad(loss)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, opt_state), values = jax.lax.scan(
            step, (params, opt_state), jax.random.split(key, chunk)
        )
        return params, opt_state, values[-1]

    args = (params, tx.init(params), jax.random.key(1))
    return JaxCase(name, jax.jit(run), args, carry=2, loss_index=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    params = mlp_params(jax.random.key(0), args.hidden)
    adam = optax.adam(1e-3)
    r, c = args.rank, args.chunk
    cases = [
        case("Adam", adam, params, c),
        case(f"GaLore r={r}, T={c // 2}", jv.galore(adam, r, update_proj_gap=c // 2), params, c),
        case(f"GaLore r={r}, T=1", jv.galore(adam, r, update_proj_gap=1), params, c),
        case(f"GaLore r={r}, T=never", jv.galore(adam, r, update_proj_gap=2**30), params, c),
    ]
    results = run_rounds(cases, steps=args.rounds, warmup=2, log=log)
    base = results[0]
    print(f"jax {jax.__version__}, MLP 64-{args.hidden}-{args.hidden}-10, {c} steps per call, "
          f"{args.rounds} rounds, load {os.getloadavg()}")  # fmt: skip
    print("| case | CPU ms / step | x Adam (CPU) | x Adam (wall) |")
    print("| --- | ---: | ---: | ---: |")
    for m in results:
        print(f"| {m.name} | {1e3 * m.cpu / c:.3f} | {m.cpu / base.cpu:.2f} | "
              f"{m.wall / base.wall:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
