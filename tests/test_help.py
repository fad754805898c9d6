# --help of every script: exit 0, each option with its default, and every option documented by the
# comment beside it in the defaults block (configurator.documented parses it).
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

import configurator
from conftest import ROOT

PREPARES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "data", "*", "prepare.py")))
MODELS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "models", "*", "prepare.py")))
SCRIPTS = ["train.py", "eval.py", "sample.py", "demo.py", *PREPARES, *MODELS]


def load(script):
    spec = importlib.util.spec_from_file_location(f"help_{script.replace('/', '_')[:-3]}", os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def options(script):
    """-> (the file whose defaults block documents the script's options, its DEFAULTS)."""
    module = load(script)
    if not hasattr(module, "DEFAULTS"):  # the download scripts share data/common.py's options
        module = module.common
    return getattr(module, "DOC_FILES", module.__file__), module.DEFAULTS  # train.py: its own and its methods'


def test_every_script_is_covered():
    assert len(PREPARES) == 10 and "data/demo/prepare.py" in PREPARES and "models/smollm2/prepare.py" in MODELS


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_a_description(script):
    path, defaults = options(script)
    rows = configurator.documented(path, defaults)
    assert [key for _, key, _ in rows] == list(defaults)  # each once, in the file's order
    assert [key for _, key, desc in rows if not desc] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_option_with_its_default(script):
    path, defaults = options(script)
    p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        usage = f.read().split('"""')[1].strip().splitlines()[0]
    assert p.stdout.startswith(usage)  # the script's own docstring first
    lines = p.stdout.splitlines()
    for key, value in defaults.items():
        shown = f'--{key}=""' if value == "" else f"--{key}={value}"
        line = next(i for i, line in enumerate(lines) if line.split()[:1] == [shown])
        desc = next(d for _, k, d in configurator.documented(path, defaults) if k == key)
        rest = " ".join(lines[line].split()[1:] + (lines[line + 1].split() if len(lines[line].split()) == 1 else []))
        assert rest == f"{type(value).__name__} {' '.join(desc.split())}", lines[line]


def test_short_flag_and_groups():
    p = subprocess.run([sys.executable, "sample.py", "-h"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    # grouped as the file groups them: each heading comment comes right before its first option
    out = p.stdout[p.stdout.index("\noptions: "):]
    assert out.index("# the prompts") < out.index("--prompt=") < out.index("# decoding") < out.index("--temperature=")


def test_documented_reads_comments_not_strings(tmp_path):
    src = tmp_path / "script.py"
    src.write_text('"""doc"""\nimport os\n# ----\n# group one\n# second line\na = "x # not a comment"  # the a\n'
                   '                         # goes on\nb = 2\n\n# group two\nc = (1 +\n     2)  # spans lines\n'
                   '# group three\ne = 1  # e\nDEFAULTS = {}\n')
    defaults = {"a": "x # not a comment", "b": 2, "c": 3, "e": 1, "d": 4.0}
    assert configurator.documented(str(src), defaults) == [
        (["group one", "second line"], "a", "the a goes on"), ([], "b", ""), (["group two"], "c", "spans lines"),
        (["group three"], "e", "e"), ([], "d", "")]
    text = configurator.help_text(str(src), defaults)
    assert text.startswith("doc\n") and "--a=x # not a comment" in text and "# group one\n# second line\n  --a=" in text


def test_method_settings_listed_under_their_method():
    """A method's settings are declared in its own module and --help shows them under its heading there."""
    import train
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    text = p.stdout
    for module, key in (("beamlora", "tau"), ("adalora", "deltaT"), ("increlora", "top_h"), ("relora", "relora_steps"),
                        ("lrlora", "r_max")):
        assert key in train.method_settings(train.METHODS[module]) and key not in vars(train)
        heading = text.rfind("\n# ", 0, text.index(f"  --{key}="))
        assert module in text[heading:text.index("\n", heading + 1)].lower().replace("-", ""), key
