"""Low-rank layers in place of full-rank ones, on scikit-learn's digits (offline).

An MLP ``64 -> 128 -> 128 -> 10`` with ReLUs is trained from scratch three ways: full-rank
``nn.Dense`` hidden layers (the baseline), and both hidden layers replaced by
``jlora.lowrank.LowRankDense`` (``x a b + bias``, rank ``r``) initialised either rank-aware
(spectral: the rescaled top-``r`` part of a full-rank draw, balanced factors) or as an
"autoencoder" (two default-initialised Dense kernels). The head stays a full ``nn.Dense``. Each
model trains from scratch with Adam (lr 1e-3) and with SGD + momentum 0.9 at lr 0.02 and 0.05 (the
full-rank baseline trains well up to 0.1), batches of 32, the same seeds (seed: split, init, batch
order); test accuracy is recorded before training (epoch 0) and after every epoch. Adam rescales
each parameter's step, so it hides most of what the factorisation and its init do to the step
sizes; SGD does not.

Run: ``python examples/lowrank_layers.py --figure docs/figures/lowrank_digits.png`` (``--quick``
for a smoke run). Prints a markdown table per optimizer and writes the accuracy-vs-epoch plot.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from jlora.lowrank import LowRankDense

VARIANTS = ("full", "rank_aware", "autoencoder", "full_torch", "autoencoder_torch")
"""The Flax-default models (``full``, ``rank_aware``, ``autoencoder``), then PyTorch's init."""
TORCH = ("full_torch", "autoencoder_torch")
BATCH = 32


def torch_kernel() -> jax.nn.initializers.Initializer:
    """PyTorch's ``nn.Linear`` kernel default, ``U(+-1/sqrt(fan_in))``: variance 1/(3 fan_in)."""
    return jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias(fan_in: int) -> jax.nn.initializers.Initializer:
    """PyTorch's ``nn.Linear`` bias default, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class TorchLowRank(nn.Module):
    """``x a b + bias`` initialised as two stacked PyTorch ``nn.Linear`` layers (seed 003's AE).

    ``a`` and ``b`` get the default kernel init of their fan-ins ``n`` and ``r``, so ``x a b`` has a
    third of the output variance of one default PyTorch layer (``1/(9n)`` against ``1/(3n)``).
    The first layer has no bias (as in seed 003); the bias is the second layer's.
    """

    features: int
    rank: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.param("a", torch_kernel(), (x.shape[-1], self.rank))
        b = self.param("b", torch_kernel(), (self.rank, self.features))
        y = x @ a @ b
        bias = self.param("bias", torch_bias(self.rank), (self.features,))
        return y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)


class MLP(nn.Module):
    """Two hidden layers, full-rank (``rank=None``) or low-rank with the given init scheme.

    ``init_scheme`` is a :data:`VARIANTS` name (the ``full*`` ones ignore ``rank``); the ``*_torch``
    variants initialise every layer, the head included, with PyTorch's ``nn.Linear`` default.
    """

    rank: int | None = None
    init_scheme: str = "rank_aware"
    hidden: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        torch = self.init_scheme in TORCH
        for i in range(2):
            if self.rank is None and torch:
                layer = nn.Dense(self.hidden, kernel_init=torch_kernel(),
                                 bias_init=torch_bias(x.shape[-1]), name=f"hidden_{i}")  # fmt: skip
            elif self.rank is None:
                layer = nn.Dense(self.hidden, name=f"hidden_{i}")
            elif torch:
                layer = TorchLowRank(self.hidden, self.rank, name=f"hidden_{i}")
            else:
                layer = LowRankDense(
                    self.hidden, self.rank, init_scheme=self.init_scheme, name=f"hidden_{i}"
                )
            x = nn.relu(layer(x))
        if torch:
            return nn.Dense(10, kernel_init=torch_kernel(), bias_init=torch_bias(self.hidden),
                            name="head")(x)  # fmt: skip
        return nn.Dense(10, name="head")(x)


def digits(seed: int) -> tuple[jax.Array, ...]:
    """``x_train, x_test, y_train, y_test``: 70/30 stratified split, pixels scaled to [0, 1]."""
    data = load_digits()
    split = train_test_split(
        data.data / 16.0, data.target, test_size=0.3, random_state=seed, stratify=data.target
    )
    x_tr, x_te, y_tr, y_te = split
    return (
        jnp.asarray(x_tr, jnp.float32),
        jnp.asarray(x_te, jnp.float32),
        jnp.asarray(y_tr, jnp.int32),
        jnp.asarray(y_te, jnp.int32),
    )


def train_curves(
    model: MLP, seeds: list[int], *, epochs: int, tx: optax.GradientTransformation
) -> tuple[np.ndarray, np.ndarray]:
    """Test accuracy and loss after 0, 1, ..., ``epochs`` epochs of ``tx``, ``(seeds, epochs + 1)``.

    Seed ``s`` sets the train/test split, the init and the batch order; the seeds train side by
    side under ``jax.vmap``, so each model compiles once.
    """
    x_tr, x_te, y_tr, y_te = (jnp.stack(arrays) for arrays in zip(*map(digits, seeds), strict=True))
    keys = jnp.stack([jax.random.key(seed) for seed in seeds])
    params = jax.vmap(lambda k: model.init(k, x_tr[0, :1])["params"])(keys)
    opt_state = jax.vmap(tx.init)(params)

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def epoch(params, opt_state, x, y, order):
        def step(carry, idx):
            params, opt_state = carry
            updates, opt_state = tx.update(jax.grad(loss)(params, x[idx], y[idx]), opt_state)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, (params, opt_state), order)[0]

    def evaluate(params, x, y):
        logits = model.apply({"params": params}, x)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return accuracy, optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    epoch, evaluate = jax.jit(jax.vmap(epoch)), jax.jit(jax.vmap(evaluate))
    steps = x_tr.shape[1] // BATCH
    rngs = [np.random.default_rng(seed) for seed in seeds]
    curve = [evaluate(params, x_te, y_te)]
    for _ in range(epochs):
        order = np.stack([r.permutation(x_tr.shape[1])[: steps * BATCH] for r in rngs])
        params, opt_state = epoch(params, opt_state, x_tr, y_tr, order.reshape(-1, steps, BATCH))
        curve.append(evaluate(params, x_te, y_te))
    accuracy, test_loss = (
        np.stack([np.asarray(c[i], np.float64) for c in curve], 1) for i in range(2)
    )
    return accuracy, test_loss


def epochs_to(curve: np.ndarray, level: float) -> int | None:
    """The first epoch whose accuracy reaches ``level`` (None if it never does)."""
    reached = np.flatnonzero(curve >= level)
    return int(reached[0]) if reached.size else None


def _epochs_cell(epoch: int | None, epochs: int) -> str:
    return f"> {epochs}" if epoch is None else str(epoch)


def hidden_params(rank: int | None, hidden: int = 128, inputs: int = 64) -> int:
    """Parameters of the two hidden layers (weights and biases)."""
    if rank is None:
        return inputs * hidden + hidden + hidden * hidden + hidden
    return rank * (inputs + hidden) + hidden + rank * (2 * hidden) + hidden


OPTIMIZERS = {
    "adam-1e-3": optax.adam(1e-3),
    # SGD with momentum sees the parametrisation (Adam rescales each parameter's step).
    "sgd-0.02": optax.sgd(0.02, momentum=0.9),
    "sgd-0.05": optax.sgd(0.05, momentum=0.9),
}
Curves = dict[tuple[str, int | None], np.ndarray]


def plot(curves: dict[str, Curves], path: str) -> None:
    """Mean test accuracy per epoch, one row per optimizer: full range, and zoomed on the top (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r for c in curves.values() for _, r in c if r is not None})
    colors = dict(zip(ranks, plt.cm.viridis(np.linspace(0, 0.9, len(ranks))), strict=True))
    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 3.8 * len(curves)), squeeze=False)
    for row, (optimizer, runs) in zip(axes, curves.items(), strict=True):
        for ax, ylim in zip(row, ((0.0, 1.0), (0.85, 1.0)), strict=True):
            for (variant, rank), accuracy in runs.items():
                if variant in TORCH:  # drawn by plot_seed_003
                    continue
                style = "--" if variant == "autoencoder" else "-"
                color = "black" if rank is None else colors[rank]
                ax.plot(
                    accuracy.mean(0),
                    style,
                    color=color,
                    label="full rank" if rank is None else f"{variant} r={rank}",
                    lw=2.2 if rank is None else 1.2,
                )
                if ylim[0] == 0.0:  # per-seed curves: the mean hides seeds that collapse
                    ax.plot(accuracy.T, style, color=color, lw=0.5, alpha=0.3)
            ax.set(xlabel="epoch", ylabel="test accuracy", ylim=ylim)
            ax.grid(alpha=0.3)
        row[0].set_title(f"{optimizer}: seed means (thick) and every seed (thin)")
        row[1].set_title(f"{optimizer}: zoom on seed means")
    axes[0, 1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    # A 64-colour palette keeps the committed PNG small (pillow ships with matplotlib).
    from PIL import Image

    Image.open(buffer).convert("RGB").quantize(colors=64).save(path, format="png", optimize=True)


SEED_003 = {"full": ("black", "full, Flax"), "full_torch": ("grey", "full, PyTorch init"),
            "rank_aware": ("tab:green", "rank-aware"), "autoencoder": ("tab:blue", "AE, Flax"),
            "autoencoder_torch": ("tab:red", "AE, PyTorch init")}  # fmt: skip


def plot_seed_003(curves: dict[str, Curves], path: str, ranks: tuple[int, ...]) -> None:
    """Every seed's test accuracy per epoch (no means), one panel per optimizer and rank (PNG).

    Seed 003's comparison: the autoencoder with PyTorch's default init against the Flax
    (variance-matched) one, the rank-aware init and both full-rank baselines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), len(ranks), figsize=(3.6 * len(ranks), 3.0 * len(curves)),
                             squeeze=False, sharey=True)  # fmt: skip
    for row, (optimizer, runs) in zip(axes, curves.items(), strict=True):
        for ax, rank in zip(row, ranks, strict=True):
            for variant, (color, label) in SEED_003.items():
                accuracy = runs[variant, None if variant.startswith("full") else rank]
                lines = ax.plot(accuracy.T, color=color, lw=0.9, alpha=0.7)
                lines[0].set_label(label)
            ax.set(title=f"{optimizer}, r = {rank}", xlabel="epoch", ylim=(0, 1))
            ax.grid(alpha=0.3)
        row[0].set_ylabel("test accuracy (every seed)")
    axes[-1, -1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=70)
    plt.close(fig)
    from PIL import Image  # a 64-colour palette keeps the committed PNG small

    Image.open(buffer).convert("RGB").quantize(colors=64).save(path, format="png", optimize=True)


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval of the mean over seeds (the seeds are independent runs)."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if values.size < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return mean, mean - half, mean + half


def _ci(values: np.ndarray) -> str:
    mean, lo, hi = interval(values)
    return f"{mean:.3f} [{max(lo, 0.0):.3f}, {min(hi, 1.0):.3f}]"


def _epochs_spread(curves: np.ndarray, level: float) -> str:
    """Per seed: the median and range of the first epoch reaching ``level`` (never: > epochs)."""
    epochs = curves.shape[1] - 1
    firsts = [epochs_to(c, level) for c in curves]
    reached = sorted(f for f in firsts if f is not None)
    if len(reached) < len(firsts) / 2:
        return f"> {epochs} ({len(reached)}/{len(firsts)} seeds reach it)"
    values = reached + [epochs + 1] * (len(firsts) - len(reached))  # "never" sorts last
    median = int(np.median(values)) if len(values) % 2 else float(np.median(values))
    top = "never" if len(reached) < len(firsts) else str(reached[-1])
    return f"{median} ({reached[0]}-{top})"


def table(curves: Curves, losses: Curves) -> str:
    """One markdown row per variant and rank: means with 95% intervals over the seeds."""
    epochs = next(iter(curves.values())).shape[1] - 1
    header = ["variant", "r", "hidden params", "test loss at init", "acc. epoch 0 [95% CI]",
              "acc. epoch 1 [95% CI]",
              f"acc. epoch {epochs} [95% CI]", f"epoch-{epochs} acc. per seed (min-max)",
              "seeds at chance (< 0.2)", "epochs to 95% (median, range)",
              "epochs to 97% (median, range)"]  # fmt: skip
    rows = [header, ["---"] * len(header)]
    for (variant, rank), accuracy in curves.items():
        final = accuracy[:, -1]
        rows.append(
            [variant, str(rank or "-"), f"{hidden_params(rank):,}",
             f"{losses[variant, rank][:, 0].mean():.3f}", _ci(accuracy[:, 0]), _ci(accuracy[:, 1]),
             _ci(final),
             f"{final.min():.3f}-{final.max():.3f}", f"{int((final < 0.2).sum())}/{final.size}",
             *(_epochs_spread(accuracy, level) for level in (0.95, 0.97))]
        )  # fmt: skip
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> dict:
    """Trains every variant with each optimizer, prints the tables, writes the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: r in 2, 16; two seeds")
    parser.add_argument("--figure", default=None, help="the plot's path (default: a temp file)")
    parser.add_argument("--epochs", type=int, default=None, help="default 40 (quick: 8)")
    parser.add_argument("--seeds", type=int, default=None, help="default 5 (quick: 2)")
    parser.add_argument(
        "--optimizers", nargs="+", choices=tuple(OPTIMIZERS), help="default: all (quick: 2)"
    )
    parser.add_argument("--save", default=None, help="write every per-seed curve to this .npz")
    parser.add_argument(
        "--seed-003-figure", default=None, help="the per-seed PyTorch-init plot (default: temp)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ranks = (2, 16) if args.quick else (1, 2, 4, 8, 16, 32, 64)
    epochs = args.epochs or (8 if args.quick else 40)
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    runs = [("full", None), ("full_torch", None)] + [
        (v, r) for r in ranks for v in ("rank_aware", "autoencoder", "autoencoder_torch")
    ]
    curves, losses = {}, {}
    optimizers = args.optimizers or (["adam-1e-3", "sgd-0.05"] if args.quick else list(OPTIMIZERS))
    for optimizer in optimizers:
        tx = OPTIMIZERS[optimizer]
        curves[optimizer], losses[optimizer] = {}, {}
        for variant, rank in runs:
            curves[optimizer][variant, rank], losses[optimizer][variant, rank] = train_curves(
                MLP(rank, variant), seeds, epochs=epochs, tx=tx
            )
        print(
            f"### {optimizer} ({len(seeds)} seeds)\n\n{table(curves[optimizer], losses[optimizer])}\n"
        )
    figure = args.figure or tempfile.mkstemp(suffix=".png", prefix="jlora-lowrank-")[1]
    plot(curves, figure)
    seed_003 = args.seed_003_figure or tempfile.mkstemp(suffix=".png", prefix="jlora-003-")[1]
    plot_seed_003(curves, seed_003, (2, 16) if args.quick else (2, 8, 32))
    if args.save:
        np.savez(args.save, **{f"{o}/{v}/{r}": c for o, runs in curves.items()
                               for (v, r), c in runs.items()})  # fmt: skip
    print(f"plots: {figure}, {seed_003}\ndone in {time.perf_counter() - start:.0f}s")
    return {"curves": curves, "losses": losses, "figure": figure, "seed_003_figure": seed_003}


if __name__ == "__main__":
    main()
