"""Faults: aliased outputs, replacing what is not a checkpoint, kills at any moment, leftovers.

Kill tests run a child process that dies with ``os._exit`` (no cleanup, no ``finally``) at the worst
moment, or (in the slow set) is killed with SIGKILL at random times, and check that nothing was lost
and that the next run repairs and cleans up.
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from test_checkpoint import CONFIG, ROOT, _adapters, _params, _save_base

import jlora
from jlora import _atomic, _dirs, checkpoint
from jlora import peft as jpeft
from jlora.__main__ import main
from jlora.checkpoint import _disk_merge as ckpt_merge

ENV = dict(os.environ, JAX_PLATFORMS="cpu")
_TEXT = {"capture_output": True, "text": True, "check": True, "timeout": 60}


def _setup(tmp_path, seeds=(1,)):
    params = _params()
    _save_base(tmp_path / "base", params)
    adapters = {}
    for seed in seeds:
        adapters[seed] = _adapters(params, seed=seed)
        checkpoint.save(tmp_path / f"adapter{seed}", adapters[seed], CONFIG, base=params)
    return params, adapters


def _load(path):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path)


def _same_tree(got, expected):
    """Whether ``got`` is ``expected`` to float32 round-off.

    Child processes compile without the tests' XLA settings (conftest), so a merge they wrote is
    another program than the in-memory one: equal to round-off, not bit for bit. Results of
    different adapters (the old and the new state) differ by O(1), far above this bound.
    """
    flat_got = dict(jlora._paths.leaves_with_paths(got))
    flat_exp = dict(jlora._paths.leaves_with_paths(expected))

    def close(a, b) -> bool:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        bound = 64 * np.finfo(np.float32).eps * max(1.0, float(np.abs(b).max(initial=0.0)))
        return a.shape == b.shape and bool(np.all(np.abs(a - b) <= bound))

    return list(flat_got) == list(flat_exp) and all(
        close(flat_got[p], v) for p, v in flat_exp.items()
    )


def _listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _scratch_dirs(directory):
    return sorted(p.name for p in directory.iterdir() if ".jlora-merge-" in p.name)


# --- aliases of the inputs ---------------------------------------------------------------------


def test_merge_refuses_an_output_that_is_an_input_through_a_symlink(tmp_path):
    _setup(tmp_path)
    base, adapter = tmp_path / "base", tmp_path / "adapter1"
    (tmp_path / "alias").symlink_to(tmp_path)  # alias/base is base
    (tmp_path / "base_link").symlink_to(base)
    (tmp_path / "outer").symlink_to(tmp_path, target_is_directory=True)
    before = _listing(base)
    cases = [
        (tmp_path / "alias" / "base", "base", "is the same directory as"),
        (tmp_path / "base_link", "base", "is the same directory as"),
        (tmp_path / "alias" / "base" / "sub", "base", "lies inside"),
        (tmp_path / "alias" / "adapter1", "adapter", "is the same directory as"),
        (tmp_path / "outer", "base", "contains"),  # replacing it would delete the base
    ]
    for out, name, how in cases:
        with pytest.raises(
            ValueError, match=rf"would overwrite the {name} checkpoint .*: it {how}"
        ):
            checkpoint.merge_checkpoint(base, adapter, out, overwrite=True, force=True)
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--quiet", "--overwrite"]
    assert main([*argv, "--out", str(tmp_path / "alias" / "base")]) == 1
    assert _listing(base) == before
    assert _load(base)["stacked"].shape == (3, 8, 16)


def test_overlap_is_also_found_by_device_and_inode(tmp_path, monkeypatch):
    # A bind mount shows one directory under two real paths; a symlink with realpath disabled
    # stands in for it here, so only the (st_dev, st_ino) comparison can see the alias.
    (tmp_path / "base").mkdir()
    (tmp_path / "mount").symlink_to(tmp_path)
    monkeypatch.setattr(_dirs.os.path, "realpath", os.path.abspath)
    assert _dirs.relation(tmp_path / "mount" / "base", tmp_path / "base") == "same"
    assert _dirs.relation(tmp_path / "mount" / "base" / "x" / "y", tmp_path / "base") == "inside"
    assert _dirs.relation(tmp_path / "base", tmp_path / "mount") == "inside"
    assert _dirs.relation(tmp_path / "other", tmp_path / "base") is None


# --- what --overwrite may replace --------------------------------------------------------------


def test_overwrite_replaces_only_what_jlora_could_have_written(tmp_path, capsys):
    params, adapters = _setup(tmp_path)
    base, adapter = tmp_path / "base", tmp_path / "adapter1"
    expected = jlora.merge(params, adapters[1])
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep")
    user_file = tmp_path / "file"
    user_file.write_text("keep")
    checkpoint.merge_checkpoint(base, adapter, tmp_path / "merged")
    (tmp_path / "merged" / "README").write_text("mine")  # a checkpoint with a user's file in it
    cases = [
        (user_dir, r"is a directory holding \['notes.txt'\], not an orbax PyTree checkpoint"),
        (user_file, r"is a file; overwrite replaces only a checkpoint jlora could have written"),
        (tmp_path / "merged", r"is a directory holding \['README'\]"),
    ]
    for out, match in cases:
        with pytest.raises(FileExistsError, match=match):
            checkpoint.merge_checkpoint(base, adapter, out, overwrite=True)
        argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]
        assert main([*argv, "--quiet", "--overwrite"]) == 1
        assert "--force-replace-non-checkpoint" in capsys.readouterr().err
    assert (user_dir / "notes.txt").read_text() == "keep" and user_file.read_text() == "keep"
    # Forced, or an empty directory, or an orbax checkpoint: replaced.
    assert main([*argv, "--quiet", "--overwrite", "--force-replace-non-checkpoint"]) == 0
    (tmp_path / "empty").mkdir()
    for out in (user_dir, tmp_path / "empty", tmp_path / "merged"):
        force = out == user_dir
        checkpoint.merge_checkpoint(base, adapter, out, overwrite=True, force=force)
        assert _same_tree(_load(out), expected)
    assert _dirs.is_replaceable(tmp_path / "base")  # any orbax PyTree checkpoint
    assert not _dirs.is_replaceable(adapter)  # a composite (adapter) checkpoint is not one
    assert _scratch_dirs(tmp_path) == []


def test_relative_paths_are_accepted(tmp_path, monkeypatch):
    params, adapters = _setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    summary = checkpoint.merge_checkpoint("base", "adapter1", "out")
    assert summary.out == tmp_path / "out"
    assert _same_tree(_load(tmp_path / "out"), jlora.merge(params, adapters[1]))
    with pytest.raises(ValueError, match=r"would overwrite the base checkpoint"):
        checkpoint.merge_checkpoint("base", "adapter1", "./base/../base", overwrite=True)


def test_a_failed_write_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    _setup(tmp_path)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter1", tmp_path / "out"

    def full_disk(target, values):
        (target / "junk").mkdir(parents=True, exist_ok=True)
        raise RuntimeError(
            "RESOURCE_EXHAUSTED: Error writing local file: No space left on device\n" * 50
        )

    monkeypatch.setattr(ckpt_merge, "_write_group", full_disk)
    with pytest.raises(
        OSError,
        match=r"^writing the merged checkpoint failed \(RuntimeError: RESOURCE_EXHAUSTED: .*\); "
        r"the partial checkpoint in .* was removed and .*out was not touched. Is the disk full\?",
    ):
        checkpoint.merge_checkpoint(base, adapter, out)
    assert _scratch_dirs(tmp_path) == [] and not out.exists()
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("jlora merge: error: writing the merged checkpoint failed")
        and len(err.splitlines()) == 1
    )


def test_a_save_that_fails_to_write_is_one_oserror_and_leaves_nothing(tmp_path, monkeypatch):
    async def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    params = _params()
    checkpoint.save(tmp_path, _adapters(params), CONFIG, step=1)
    (tmp_path / "2.orbax-checkpoint-tmp").mkdir()  # not this save's (maybe a live orbax's)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", full_disk)
    with pytest.raises(OSError, match=r"2: writing the adapter checkpoint failed") as caught:
        checkpoint.save(tmp_path, _adapters(params, seed=2), CONFIG, step=2)
    assert caught.value.errno == 28
    assert str(caught.value).endswith(
        "(No space left on device); nothing was saved there and the partial files were "
        "removed. Free space and save again"
    )
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.orbax-checkpoint-tmp"]


def test_partial_files_still_being_written_are_left_to_the_next_save(tmp_path, monkeypatch):
    # As if orbax's writes outlived the wait: the directory cannot be deleted yet.
    async def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    def busy(self, *args, **kwargs):
        raise OSError(39, "Directory not empty")

    params = _params()
    with monkeypatch.context() as patch:
        patch.setattr(ocp.JsonCheckpointHandler, "async_save", full_disk)
        patch.setattr(epath.gpath._GPath, "rmtree", busy)
        patch.setattr(_atomic.time, "sleep", lambda seconds: None)
        with pytest.raises(OSError, match=r"the partial files in .*\.1\.jlora-save-\d+-\w+ are "):
            checkpoint.save(tmp_path, _adapters(params), CONFIG, step=1)
    (left,) = tmp_path.iterdir()
    assert json.loads((left / "journal.json").read_text())["state"] == "failed"
    checkpoint.save(tmp_path, _adapters(params), CONFIG, step=1)  # removes it, and saves
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_a_save_beyond_the_file_size_limit_says_so_in_one_line(tmp_path):
    # A real write failure (EFBIG from RLIMIT_FSIZE, as close to a full disk as a test gets
    # without root), in a child whose whole stderr is the one uncaught error.
    checkpoint.save(tmp_path, _adapters(_params()), CONFIG, step=1)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import resource, signal, sys
            sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
            from test_checkpoint import CONFIG, _adapters, _params
            from jlora import checkpoint
            adapters = _adapters(_params(), seed=2)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
            try:
                checkpoint.save({str(tmp_path)!r}, adapters, CONFIG, step=2)
            except OSError as e:
                print(e, file=sys.stderr)
                sys.exit(17)
            """),
        ],
        env=ENV,
        cwd=ROOT,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 17, done.stderr[-3000:]
    assert done.stderr == (
        f"[Errno 27] {tmp_path / '2'}: writing the adapter checkpoint failed (File too large); "
        "nothing was saved there and the partial files were removed. Raise the file size limit "
        "(ulimit -f) and save again\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_a_save_removes_only_the_leftovers_of_saves_that_can_no_longer_finish(tmp_path):
    params = _params()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **_TEXT)
    dead_pid = int(dead.stdout)
    killed = tmp_path / f".7.jlora-save-{dead_pid}-0123456789ab"  # a killed save's
    killed.mkdir()
    (killed / "checkpoint.orbax-checkpoint-tmp").mkdir()
    live = _atomic.Scratch.create(tmp_path / "8", kind="save")  # this process's, in flight
    failed = _atomic.Scratch.create(tmp_path / "9", kind="save")  # this process's, failed
    failed.write_state("failed")
    other_host = tmp_path / f".5.jlora-save-{dead_pid}-00000000000a"
    other_host.mkdir()
    (other_host / "journal.json").write_text(json.dumps({"pid": dead_pid, "host": "elsewhere"}))
    not_a_save = tmp_path / ".6.jlora-save-abc"
    not_a_save.mkdir()
    checkpoint.save(tmp_path, _adapters(params), CONFIG, step=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["1", live.path.name, other_host.name, not_a_save.name]
    )
    assert checkpoint.steps(tmp_path) == [1]


# --- kills between the renames, and leftovers ------------------------------------------------


def _run_child(script, expected_code=17):
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=ENV,
        cwd=ROOT,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.returncode == expected_code, done.stderr[-3000:]


_CHILD_HEADER = f"""
    import os, sys
    sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
    from etils import epath
    from jlora import checkpoint
"""


def test_a_kill_between_the_two_renames_is_completed_by_the_next_run(tmp_path):
    params, adapters = _setup(tmp_path, seeds=(1, 2))
    base, out = tmp_path / "base", tmp_path / "out"
    checkpoint.merge_checkpoint(base, tmp_path / "adapter1", out)
    # The child sets the old output aside and dies before renaming the new one in.
    _run_child(
        _CHILD_HEADER
        + f"""
    rename = epath.gpath._GPath.rename
    def dying_rename(self, target):
        result = rename(self, target)
        if str(target).endswith("/previous"):
            os._exit(17)
        return result
    epath.gpath._GPath.rename = dying_rename
    checkpoint.merge_checkpoint({str(base)!r}, {str(tmp_path / "adapter2")!r}, {str(out)!r},
                                overwrite=True)
    """
    )
    assert not out.exists()
    (scratch,) = _scratch_dirs(tmp_path)
    assert json.loads((tmp_path / scratch / "journal.json").read_text())["state"] == "swapping"
    actions = checkpoint.recover_merge(out)
    assert actions[0] == f"completed the interrupted replacement of {out}"
    assert _same_tree(_load(out), jlora.merge(params, adapters[2]))  # the new one was complete
    assert _scratch_dirs(tmp_path) == []
    assert checkpoint.recover_merge(out) == []


def test_leftovers_of_killed_merges_are_removed_by_the_next_merge(tmp_path, capsys):
    params, adapters = _setup(tmp_path, seeds=(1, 2))
    base, out = tmp_path / "base", tmp_path / "out"
    checkpoint.merge_checkpoint(base, tmp_path / "adapter1", out)
    # Killed half way through writing the new checkpoint: the old output is untouched.
    _run_child(
        _CHILD_HEADER
        + f"""
    from jlora.checkpoint import _disk_merge as _ckpt_merge
    _ckpt_merge._write_group = lambda *a: os._exit(17)
    checkpoint.merge_checkpoint({str(base)!r}, {str(tmp_path / "adapter2")!r}, {str(out)!r},
                                overwrite=True)
    """
    )
    assert len(_scratch_dirs(tmp_path)) == 1
    assert _same_tree(_load(out), jlora.merge(params, adapters[1]))
    # A scratch directory of a live merge (this process) and one of another output stay.
    live = _atomic.Scratch.create(out)
    other = _atomic.Scratch.create(tmp_path / "other")
    argv = ["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter2")]
    assert main([*argv, "--out", str(out), "--overwrite", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("removed ") and "left by a merge that did not finish" in printed
    assert _scratch_dirs(tmp_path) == sorted([live.path.name, other.path.name])
    assert _same_tree(_load(out), jlora.merge(params, adapters[2]))
    # A journal whose process id now belongs to another process (started at another time) is a
    # dead merge's.
    journal = json.loads((live.path / "journal.json").read_text())
    (live.path / "journal.json").write_text(json.dumps({**journal, "start": "1"}))
    assert checkpoint.recover_merge(out) == [
        f"removed {live.path}, left by a merge that did not finish"
    ]
    assert main(["recover", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"nothing to recover for {out}\n"
    assert _scratch_dirs(tmp_path) == [other.path.name]


def test_a_scratch_directory_of_an_earlier_jlora_is_restored(tmp_path):
    # jlora before the journal named scratch directories `.<out>.jlora-merge-<12 hex>`; a kill
    # between its renames left the old output in `previous`.
    params, adapters = _setup(tmp_path)
    out = tmp_path / "out"
    checkpoint.merge_checkpoint(tmp_path / "base", tmp_path / "adapter1", out)
    legacy = tmp_path / ".out.jlora-merge-0123456789ab"
    legacy.mkdir()
    out.rename(legacy / "previous")
    assert checkpoint.recover_merge(out) == [
        f"restored {out} from {legacy / 'previous'} (an interrupted --overwrite)"
    ]
    assert _same_tree(_load(out), jlora.merge(params, adapters[1]))


# --- kill loops (slow) -------------------------------------------------------------------------


def _kill_at_random(command, seconds, rng):
    # Most of a child's life is importing jax; kills are drawn from its second half, where it
    # writes.
    child = subprocess.Popen(
        command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(rng.uniform(0.5 * seconds, seconds))
    killed = child.poll() is None
    if killed:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return killed


def _timed(command):
    start = time.perf_counter()
    subprocess.run(command, env=ENV, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


@pytest.mark.slow
def test_merge_overwrite_survives_random_kills(tmp_path):
    params, adapters = _setup(tmp_path, seeds=(1, 2))
    base, out = tmp_path / "base", tmp_path / "out"
    expected = {seed: jlora.merge(params, adapters[seed]) for seed in (1, 2)}
    base_files = _listing(base)

    # The first rename of --overwrite is followed by a pause, so that random kills land between
    # the two renames too, not only while the checkpoint is written.
    script = textwrap.dedent("""
        import sys, time
        from etils import epath
        from jlora.__main__ import main
        rename = epath.gpath._GPath.rename
        def slow_rename(self, target):
            result = rename(self, target)
            if str(target).endswith("/previous"):
                time.sleep(0.5)
            return result
        epath.gpath._GPath.rename = slow_rename
        sys.exit(main(sys.argv[1:]))
    """)

    def argv(seed):
        return [sys.executable, "-c", script, "merge", "--base", str(base), "--adapter",
                str(tmp_path / f"adapter{seed}"), "--out", str(out), "--overwrite", "--quiet",
                "--group-mib", "0.001"]  # fmt: skip

    duration = _timed(argv(1))
    rng = random.Random(0)
    kills = repaired = between = 0
    for attempt in range(60):
        seed = 1 + attempt % 2
        kills += _kill_at_random(argv(seed), duration * 1.1, rng)
        between += not out.exists()
        repaired += bool(checkpoint.recover_merge(out))
        # After any kill: the output is the previous merge or the new one, complete.
        got = _load(out)
        assert _same_tree(got, expected[1]) or _same_tree(got, expected[2]), attempt
        assert _scratch_dirs(tmp_path) == [], attempt
        if kills >= 20:
            break
    assert kills >= 20
    assert repaired >= 5 and between >= 1, (repaired, between)  # kills that left work half done
    assert _listing(base) == base_files
    _ = _load(base)


@pytest.mark.slow
def test_adapter_save_survives_random_kills(tmp_path):
    params = _params()
    saved = {}
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from test_checkpoint import CONFIG, _adapters, _params
        from jlora import checkpoint
        step = int(sys.argv[1])
        checkpoint.save({str(tmp_path)!r}, _adapters(_params(), seed=step), CONFIG, step=step,
                        base=_params())
    """)

    def command(step):
        return [sys.executable, "-c", script, str(step)]

    duration = _timed(command(0))
    saved[0] = _adapters(params, seed=0)
    rng = random.Random(1)
    kills = 0
    for step in range(1, 80):
        if _kill_at_random(command(step), duration * 1.1, rng):
            kills += 1
        for s in checkpoint.steps(tmp_path):  # every committed step restores exactly
            restored, _ = checkpoint.restore(tmp_path, step=s, base=params)
            expected = saved.setdefault(s, _adapters(params, seed=s))
            assert _same_tree(restored, expected), s
        if kills >= 20:
            break
    assert kills >= 20
    assert 0 in checkpoint.steps(tmp_path)
    # Killed saves leave only their scratch directories, which the next save removes.
    assert all(p.name.isdigit() or ".jlora-save-" in p.name for p in tmp_path.iterdir())
    checkpoint.save(tmp_path, saved[0], CONFIG, step=1000)
    assert all(p.name.isdigit() for p in tmp_path.iterdir())


@pytest.mark.slow
def test_peft_save_survives_random_kills(tmp_path):
    from test_peft import CONFIG as PEFT_CONFIG
    from test_peft import _trained
    from trees import transformer_params

    params = transformer_params()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from test_peft import CONFIG, _trained
        from trees import transformer_params
        import os, time
        import jlora
        from jlora import peft
        replace = os.replace
        def slow_replace(source, target):  # widens the window between the two renames
            replace(source, target)
            if str(target).endswith(".safetensors"):
                time.sleep(0.3)
        os.replace = slow_replace
        seed = int(sys.argv[1])
        alpha = 1.0 + seed  # each save differs in its tensors and in its config's scale
        config = jlora.LoraConfig(**{{**CONFIG.to_dict(), "alpha": alpha}})
        peft.save({str(tmp_path)!r}, _trained(transformer_params(), config, seed=seed), config)
    """)

    def command(seed):
        return [sys.executable, "-c", script, str(seed)]

    def expected(seed):
        config = jlora.LoraConfig(**{**PEFT_CONFIG.to_dict(), "alpha": 1.0 + seed})
        return _trained(params, config, seed=seed), config

    duration = _timed(command(0))
    rng = random.Random(2)
    kills, last, mixed = 0, 0, 0
    for seed in range(1, 80):
        killed = _kill_at_random(command(seed), duration * 1.1, rng)
        kills += killed
        mixed += _mixed_pair(tmp_path)
        loaded, config = jpeft.load(tmp_path, params)
        # The pair on disk is the last complete save's or this one's, never a mixture.
        matches = [s for s in (last, seed) if _same_adapters(loaded, config, *expected(s))]
        assert matches, seed
        last = matches[-1]
        if kills >= 20:
            break
    assert kills >= 20 and mixed >= 1, (kills, mixed)


def _mixed_pair(directory):
    metadata = jlora.peft._files.read_metadata(str(directory / "adapter_model.safetensors"))
    config = json.loads((directory / "adapter_config.json").read_text())
    return metadata["jlora_config_sha256"] != jlora.peft._files.config_digest(config)


def _same_adapters(loaded, config, adapters, expected_config):
    a, b = jlora._merge.factors_by_path(loaded), jlora._merge.factors_by_path(adapters)
    return list(a) == list(b) and all(
        a[p].scale == expected_config.scale_for(p)
        and np.array_equal(a[p].a, b[p].a)
        and np.array_equal(a[p].b, b[p].b)
        for p in b
    )
