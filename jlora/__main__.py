"""The ``jlora`` command line: ``python -m jlora merge --base DIR --adapter DIR --out DIR``.

``merge`` folds an adapter checkpoint (from ``jlora.checkpoint.save``) into a base model's orbax
checkpoint and writes a new one, leaf group by leaf group, with a progress bar and a summary (see
:func:`jlora.checkpoint.merge_checkpoint`). ``recover --out DIR`` repairs the output of a killed
merge and deletes its leftovers (see :func:`jlora.checkpoint.recover_merge`); ``merge`` does this
itself first.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
from collections.abc import Sequence

from .checkpoint._disk_merge import DEFAULT_GROUP_BYTES, merge_checkpoint, recover_merge


def _positive_mib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive number of MiB (e.g. 128, or 0.5)"
        )
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jlora", description="LoRA adapters for JAX: command-line tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser(
        "merge",
        help="merge an adapter checkpoint into a base checkpoint on disk",
        description="Writes OUT = BASE + scale * a @ b for every adapted weight, reading and "
        "writing a bounded group of leaves at a time. Neither input is modified.",
    )
    merge.add_argument("--base", required=True, help="the base model's orbax PyTree checkpoint")
    merge.add_argument(
        "--adapter",
        required=True,
        help="an adapter checkpoint from jlora.checkpoint.save (or a root of steps: the latest)",
    )
    merge.add_argument("--out", required=True, help="directory for the merged checkpoint")
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists (once the new one is done); only an orbax PyTree "
        "checkpoint or an empty directory is replaced",
    )
    merge.add_argument(
        "--force-replace-non-checkpoint",
        action="store_true",
        help="with --overwrite, replace OUT even if it is not a checkpoint (a file, or a "
        "directory of other files)",
    )
    merge.add_argument("--adapter-step", type=int, default=None, help="use this adapter step")
    merge.add_argument(
        "--group-mib",
        type=_positive_mib,
        default=DEFAULT_GROUP_BYTES / 2**20,
        help="MiB of base leaves read and written together (default %(default)g)",
    )
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument(
        "--no-check-finite",
        action="store_true",
        help="write merged weights even if they hold NaN/Inf where the base is finite",
    )
    merge.add_argument(
        "--no-base-digest",
        action="store_true",
        help="check the base against the adapters' saved fingerprint by shape only, not content",
    )
    recover = commands.add_parser(
        "recover",
        help="repair the output of a killed merge and delete its leftovers",
        description="Puts OUT back in place after a merge killed while replacing it (the new "
        "checkpoint if it was complete, else the old one) and deletes the scratch directories "
        "of merges into OUT that are no longer running. merge does this itself first.",
    )
    recover.add_argument("--out", required=True, help="the output directory of the merge")
    return parser


def _release_freed_buffers_at_once() -> None:
    # glibc raises its mmap threshold after each large free (up to 32 MiB), after which freed
    # leaf-sized buffers stay in the heap and the resident size creeps towards a model's worth. A
    # fixed threshold keeps them mmapped, returned to the OS when freed. Only the command line does
    # this: it owns its process, while the Python API leaves the allocator to its caller.
    m_mmap_threshold = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to tune
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``jlora`` command line; returns the process exit status.

    Args:
        argv: the arguments after the program name (``sys.argv[1:]`` when None).

    Returns:
        0 on success, 1 when the merge fails (the reason is printed to stderr). Invalid arguments
        exit with status 2 (argparse).

    On glibc, ``merge`` first fixes the process's mmap threshold at 1 MiB so that freed leaf
    buffers go back to the OS at once (the command line owns its process; the Python API
    :func:`jlora.checkpoint.merge_checkpoint` leaves the allocator alone).

    Example:
        >>> main(["merge", "--base", "/nonexistent/base", "--adapter", "/nonexistent/a",
        ...       "--out", "/nonexistent/out", "--quiet"])
        1
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "recover":
            actions = recover_merge(args.out)
            print("\n".join(actions) if actions else f"nothing to recover for {args.out}")
            return 0
        _release_freed_buffers_at_once()
        summary = merge_checkpoint(
            args.base,
            args.adapter,
            args.out,
            overwrite=args.overwrite,
            force=args.force_replace_non_checkpoint,
            adapter_step=args.adapter_step,
            group_bytes=max(1, int(args.group_mib * 2**20)),
            progress=not args.quiet,
            check_finite=not args.no_check_finite,
            base_digest=not args.no_base_digest,
        )
    except (OSError, ValueError, TypeError) as e:  # AdapterMismatchError is a ValueError
        print(f"jlora {args.command}: error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
