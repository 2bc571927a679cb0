"""The console scripts pyproject.toml declares are installed beside the interpreter and are
the same commands as `python -m MODULE`: each answers --help, and bad input is one line."""

import subprocess
import sys
import tomllib
from pathlib import Path

from helpers import ROOT, env

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
BIN = Path(sys.executable).parent


def test_every_script_is_installed_and_answers_help():
    procs = {name: subprocess.Popen([str(BIN / name), "--help"], env=env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in SCRIPTS}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        module = SCRIPTS[name].split(":")[0]
        assert p.returncode == 0, (name, err[-2000:])
        prog = module.removesuffix(".launch").removesuffix(".cli")
        assert out.startswith("usage: python -m " + prog), (name, out[:200])


def test_bad_input_through_a_script_is_one_line():
    r = subprocess.run([str(BIN / "gpt2-train"), "--config", str(ROOT / "configs/tiny.toml"),
                        "--optim.lr=-1", "--print-run-dir"], env=env(), text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: optim.lr must be positive, got -1.0"]
