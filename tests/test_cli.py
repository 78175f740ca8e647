"""Every command reports a user error as one line ``kindjax.<name>: …`` with exit status 1, and
importing kindjax defines no command-line flags."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (module, arguments, what the line says); {tmp} is a fresh folder.  Cheap failures only.
BAD_INPUTS = [
    ("kindjax.main", ["--config", "configs/nope.py", "--workdir", "{tmp}"], "no config file 'configs/nope.py'"),
    ("kindjax.main", ["--config", "configs/kind_dit_b.py:task_99", "--workdir", "{tmp}"], "the task is one of"),
    ("kindjax.tools.encode", ["--config", "configs/dit_digits.py"], "--out must have a value"),
    ("kindjax.tools.encode", ["--config", "configs/dit_digits.py", "--out", "{tmp}"], "no VAE given"),
    ("kindjax.evaluation.__main__", ["--config", "configs/dit_digits.py", "--workdir", "{tmp}/none"], "eval.reference is not set"),
    ("kindjax.sweep", ["--config", "configs/kind_digits.py", "--workdir", "{tmp}", "--methods", "kind,nope"],
     "unknown methods ['nope']"),
    ("kindjax.sweep", ["--config", "configs/kind_digits.py", "--workdir", "{tmp}", "--shard", "2/2"], "need 0 ≤ i < n"),
    ("kindjax.sweep", ["--config", "configs/kind_digits.py", "--workdir", "{tmp}", "--experiment", "table1",
                       "--sizes", "1k"], "--sizes 1k: --size 1,000 is below the smallest KIND model"),
    ("kindjax.sweep", ["--config", "configs/kind_domain_shift.py:,L", "--workdir", "{tmp}"], "data.root is not set"),
    ("kindjax.papers.kind.accounting", ["--config", "configs/kind_digits.py", "--methods", "nope"], "unknown methods ['nope']"),
    ("kindjax.papers.kind.accounting", ["--config", "configs/kind_digits.py", "--clases", "3"], "Unknown command line flag"),
    ("kindjax.papers.kind.sizes", ["--learngene", "{tmp}/none", "--workdir", "{tmp}/out", "--size", "1M"],
     "holds no kindjax checkpoint"),
    ("kindjax.tools.bench", ["--arch", "M"], "--arch=M: value should be one of"),
    ("kindjax.tools.bench", ["--image_size", "7"], "not divisible by model.patch_size=2"),
    ("kindjax.evaluation.inception", ["{tmp}/nope.pth", "{tmp}/out.npz"], "nope.pth is not a file"),
    ("kindjax.evaluation.inception", ["only_one.pth"], "usage: python -m kindjax.evaluation.inception"),
]


@pytest.mark.parametrize("module,args,says", BAD_INPUTS, ids=[f"{m}:{s[:20]}" for m, _, s in BAD_INPUTS])
def test_user_error_is_one_line(module, args, says, tmp_path, single_device_env):
    args = [a.format(tmp=tmp_path) for a in args]
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=single_device_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(module + ": ") and says in lines[0], lines[0]


IMPORT_ALL = """
import importlib, pkgutil
from absl import flags
import kindjax
names = [m.name for m in pkgutil.walk_packages(kindjax.__path__, "kindjax.")]
for name in names:
    importlib.import_module(name)
defined = sorted(m for m in flags.FLAGS.flags_by_module_dict() if m.startswith("kindjax"))
assert not defined, f"flags defined at import by {defined}"
assert "config" not in flags.FLAGS and "workdir" not in flags.FLAGS
print(len(names))
"""


def test_imports_define_no_flags(single_device_env):
    """Every module can be imported (in one interpreter, beside any command) without defining a flag."""
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, env=single_device_env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) > 30
