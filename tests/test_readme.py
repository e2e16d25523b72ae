"""The README's quickstart runs as written, and its two set-up commands exist."""

import pathlib
import re

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_runs_and_is_short(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 1
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 25
    # optax's Adam mixes int32 counts with floats, which strict promotion refuses: scope it out.
    with jax.numpy_dtype_promotion("standard"):
        exec(compile(code, "README quickstart", "exec"), {})
    assert "trainable params: 40 || all params: 104" in capsys.readouterr().out


def test_two_setup_commands_point_at_real_scripts():
    block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/main.sh", "bash scripts/test.sh"]
    for command in commands:
        assert (ROOT / command.split()[1]).is_file()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
