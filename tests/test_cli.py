"""Every command follows kindjax/cli.py's rule: ``--help`` lists its flags and exits 0, a bad flag or
input is one line ``kindjax.<name>: …`` with exit status 1, one flag name has one type in every
command, and importing kindjax defines no command-line flags.  The commands are found by scanning
kindjax/ for ``if __name__ == "__main__":``, so a new one cannot be left out."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time

import pytest
from absl import flags

from conftest import single_device_environ
from kindjax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "kindjax")


def _runs_as_program(tree: ast.Module) -> bool:
    """The module has a top-level ``if __name__ == "__main__":``."""
    return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
               and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
               and [getattr(c, "value", None) for c in node.test.comparators] == ["__main__"]
               for node in tree.body)


def entry_points() -> dict[str, ast.Module]:
    """``python -m`` name → parsed source of every module of kindjax/ that runs as a program."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            if _runs_as_program(tree):
                module = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
                found[module.removesuffix(".__main__")] = tree
    return dict(sorted(found.items()))


ENTRY_POINTS = entry_points()
#: The commands that write a run (or a checkpoint workdir) into ``--workdir``; every other command
#: reads runs with ``--run`` and writes artifacts with ``--out`` (kindjax/cli.py).
WORKDIR_WRITERS = {"kindjax.main", "kindjax.sweep", "kindjax.tools.convert"}
#: A flag no command defines.
BAD_FLAG = "no_such_flag"


def defined_in_source(tree: ast.Module) -> set[str]:
    """Names of the flags a module's own source defines: ``flags.DEFINE_*("name", …)`` and
    :mod:`kindjax.cli`'s ``define_config`` / ``define_classes``."""
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        call = node.func.attr
        if call.startswith("DEFINE_") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(node.args[0].value)
        elif call in ("define_config", "define_classes"):
            names.add(call.removeprefix("define_"))
    return names


def help_flags(text: str) -> dict[str, str]:
    """Flag name → its type as ``--help`` shows it (absl's wording: ``an integer``, ``a number``,
    ``a comma separated list``, ``bool``, ``enum``; no annotation: a string)."""
    types: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        flag = re.match(r"  --(\[no\])?(\w+): (<[^>]*>:)?", line)
        if flag:
            name = flag.group(2)
            types[name] = "bool" if flag.group(1) else "enum" if flag.group(3) else "string"
            continue
        annotation = re.match(r"    \((an integer|a number|a [\w ]+ separated list[\w ]*|repeat this option)", line)
        if name and annotation and types[name] == "string":
            types[name] = annotation.group(1)
    return types


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=single_device_environ(),
                          capture_output=True, text=True, timeout=300)


#: One interpreter imports every kindjax module once (and reports the flags that defined), then runs
#: each command as ``python -m`` does (``runpy``, ``__name__ == "__main__"``) in a forked child:
#: 24 command runs for the CPU time of about two interpreter starts.
DRIVER = r"""
import importlib, json, os, pkgutil, runpy, sys, tempfile, traceback
from absl import flags
import kindjax
names = [m.name for m in pkgutil.walk_packages(kindjax.__path__, "kindjax.")]
for name in names:
    importlib.import_module(name)
defined = sorted(m for m in flags.FLAGS.flags_by_module_dict() if m.startswith("kindjax"))
runs = []
for module, arg in json.loads(sys.argv[1]):
    target = module if module + ".__main__" not in sys.modules else module + ".__main__"
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
            sys.modules.pop(target, None)   # run afresh as __main__, as python -m does
            sys.argv = [target, arg]
            code = 1
            try:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0); err.seek(0)
        runs.append([os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()])
print(json.dumps({"imported": len(names), "defined": defined, "runs": runs}))
"""


@pytest.fixture(scope="module")
def driver() -> dict:
    """:data:`DRIVER`'s report of ``--help`` and ``--no_such_flag`` of every command."""
    jobs = [(module, arg) for module in ENTRY_POINTS for arg in ("--help", f"--{BAD_FLAG}")]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], cwd=ROOT, env=single_device_environ(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    print(f"{len(jobs)} command runs and the imports in {time.perf_counter() - start:.1f} s")
    report["runs"] = {job: subprocess.CompletedProcess([], rc, stdout, stderr)
                      for job, (rc, stdout, stderr) in zip(jobs, report["runs"])}
    return report


@pytest.fixture(scope="module")
def runs(driver) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    return driver["runs"]


def test_entry_points_are_found():
    """The scan finds the commands (a package's ``__main__.py`` as the package), not cli.py's example."""
    assert {"kindjax.main", "kindjax.sweep", "kindjax.evaluation", "kindjax.tools.encode"} <= set(ENTRY_POINTS)
    assert "kindjax.cli" not in ENTRY_POINTS and len(ENTRY_POINTS) >= 12


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_lists_every_flag(module, runs):
    out = runs[module, "--help"]
    assert out.returncode == 0, out.stderr[-2000:]
    listed = help_flags(out.stdout)
    assert defined_in_source(ENTRY_POINTS[module]) | {"debug"} <= set(listed), out.stdout


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_unknown_flag_is_one_line(module, runs):
    out = runs[module, f"--{BAD_FLAG}"]
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [f"{module}: Unknown command line flag '{BAD_FLAG}' (see --help)"]


def test_one_type_per_flag_name(runs):
    """The same flag name has the same type in every command; ``--classes`` is a list of class ids."""
    seen: dict[str, dict[str, list[str]]] = {}
    for module in ENTRY_POINTS:
        for name, kind in help_flags(runs[module, "--help"].stdout).items():
            seen.setdefault(name, {}).setdefault(kind, []).append(module)
    mixed = {name: kinds for name, kinds in seen.items() if len(kinds) > 1}
    assert not mixed, f"one flag name, several types: {mixed}"
    assert set(seen["classes"]) == {"a comma separated list of class ids"}
    assert set(seen["num_classes"]) == {"an integer"}


def test_workdir_is_only_written(runs):
    """Only the commands that write a run take ``--workdir``; a command that reads a run takes ``--run``."""
    takes = {module for module in ENTRY_POINTS if "workdir" in help_flags(runs[module, "--help"].stdout)}
    assert takes == WORKDIR_WRITERS
    assert "run" in help_flags(runs["kindjax.evaluation", "--help"].stdout)


def test_config_flag_is_locked(tmp_path):
    """:func:`kindjax.cli.define_config` is the one ``--config`` (no command defines its own), and the
    config it reads refuses keys it does not have."""
    own = [module for module, tree in ENTRY_POINTS.items()
           if any(isinstance(n, ast.Attribute) and n.attr == "DEFINE_config_file" for n in ast.walk(tree))]
    assert not own, f"{own} define --config without kindjax.cli.define_config"
    values = flags.FlagValues()
    cli.define_config("config", values)
    values(["prog", "--config", os.path.join(ROOT, "configs/dit_digits.py")])
    values.config.train.num_steps = 3
    with pytest.raises(AttributeError):
        values.config.train.num_stpes = 3
    with pytest.raises(AttributeError):
        values.config.new_section = {}


def test_classes_are_class_ids():
    values = flags.FlagValues()
    cli.define_classes("ids", flag_values=values)
    values(["prog", "--classes", "3, 0,7"])
    assert values.classes == [3, 0, 7]
    with pytest.raises(flags.IllegalFlagValueError, match="give class ids as integers, e.g. 0,3,7 .got 0,a"):
        values(["prog", "--classes", "0,a"])


#: (module, arguments, what the line says); {tmp} is a fresh folder.  Cheap failures only.
BAD_INPUTS = [
    ("kindjax.main", ["--config", "configs/nope.py", "--workdir", "{tmp}"], "no config file 'configs/nope.py'"),
    ("kindjax.main", ["--config", "configs/kind_dit_b.py:task_99", "--workdir", "{tmp}"], "the task is one of"),
    ("kindjax.main", ["--config", "configs/dit_digits.py", "--workdir", "{tmp}", "--config.train.num_stpes=3"],
     "--config.train.num_stpes: no config key 'train.num_stpes'; did you mean --config.train.num_steps?"),
    ("kindjax.tools.encode", ["--config", "configs/dit_digits.py"], "--out must have a value"),
    ("kindjax.tools.encode", ["--config", "configs/dit_digits.py", "--out", "{tmp}"], "no VAE given"),
    ("kindjax.evaluation", ["--config", "configs/dit_digits.py", "--run", "{tmp}/none"], "eval.reference is not set"),
    ("kindjax.evaluation", ["--config", "configs/dit_digits.py"], "--run must have a value"),
    ("kindjax.evaluation.reference", ["--config", "configs/dit_digits.py"], "--out must have a value"),
    ("kindjax.sweep", ["--config", "configs/kind_digits.py", "--workdir", "{tmp}", "--methods", "kind,nope"],
     "unknown methods ['nope']"),
    ("kindjax.sweep", ["--config", "configs/kind_digits.py", "--workdir", "{tmp}", "--shard", "2/2"], "need 0 ≤ i < n"),
    ("kindjax.sweep", ["--config", "configs/kind_digits.py", "--workdir", "{tmp}", "--experiment", "table1",
                       "--sizes", "1k"], "--sizes 1k: size 1,000 is below the smallest KIND model"),
    ("kindjax.sweep", ["--config", "configs/kind_digits.py", "--workdir", "{tmp}", "--experiment", "table1",
                       "--sizes", "big"], "--sizes: 'big' is not a parameter count"),
    ("kindjax.sweep", ["--config", "configs/kind_domain_shift.py:,L", "--workdir", "{tmp}"], "data.root is not set"),
    ("kindjax.papers.kind.accounting", ["--config", "configs/kind_digits.py", "--methods", "nope"], "unknown methods ['nope']"),
    ("kindjax.papers.kind.accounting", ["--config", "configs/kind_digits.py", "--classes", "3"],
     "Unknown command line flag 'classes'"),
    ("kindjax.tools.slice", ["--run", "{tmp}", "--out", "{tmp}/out", "--part", "tailors", "--classes", "0,a"],
     "flag --classes=0,a: give class ids as integers"),
    ("kindjax.tools.bench", ["--arch", "M"], "--arch=M: value should be one of"),
    ("kindjax.tools.bench", ["--image_size", "7"], "not divisible by model.patch_size=2"),
    ("kindjax.evaluation.inception", ["--src", "{tmp}/nope.pth", "--out", "{tmp}/out.npz"], "nope.pth is not a file"),
    ("kindjax.evaluation.inception", ["--src", "{tmp}/in.pth", "--out", "{tmp}/out.npz", "extra.npz"],
     "unexpected argument 'extra.npz': every input is a named flag"),
]


@pytest.mark.parametrize("module,args,says", BAD_INPUTS, ids=[f"{m}:{s[:20]}" for m, _, s in BAD_INPUTS])
def test_user_error_is_one_line(module, args, says, tmp_path):
    out = _run(module, *(a.format(tmp=tmp_path) for a in args))
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(module + ": ") and says in lines[0], lines[0]


def test_imports_define_no_flags(driver):
    """Every module can be imported (in one interpreter, beside any command) without defining a flag."""
    assert driver["defined"] == [] and driver["imported"] > 30


def test_driver_runs_as_python_m(runs):
    """The driver's forked ``--help`` is what a fresh ``python -m`` prints."""
    fresh = _run("kindjax.evaluation", "--help")
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (0, runs["kindjax.evaluation", "--help"].stdout, "")
