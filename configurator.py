"""
nanoGPT-style configuration: module-level defaults, overridden by config files and --key=value.

    python train.py config/llama2_7b_metamath_beamlora.py --r=32 --lr=1e-4

A config file is plain Python assigning some of the defaults (it is the user's own code, run with
exec as nanoGPT does). A --key=value is read as a Python literal when it parses as one (else as a
string) and must match the type of the default. An unknown key is an error listing the valid ones.
"""
import ast
import os
import traceback


class ConfigError(ValueError):
    pass


def coerce(key, value, default):
    if default is None:
        return value
    if isinstance(value, bool) != isinstance(default, bool):  # bool is an int in Python: --r=True is a mistake
        raise ConfigError(f"--{key}: expected {type(default).__name__}, got {value!r}")
    if isinstance(value, type(default)):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"--{key}: expected {type(default).__name__}, got {value!r}")


def parse_args(argv, defaults):
    """Returns a copy of `defaults` (a dict) updated by the config files and --key=value in argv."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"{arg}: config file not found")
            scope = {"__file__": arg}  # a config may build on another one next to it
            try:
                with open(arg, encoding="utf-8") as f:
                    exec(compile(f.read(), arg, "exec"), scope)
            except Exception as e:  # the user's own code: what failed where, in one line
                lines = [t.lineno for t in traceback.extract_tb(e.__traceback__) if t.filename == arg]
                line = e.lineno if isinstance(e, SyntaxError) else lines[-1] if lines else "?"
                raise ConfigError(f"{arg}:{line}: {type(e).__name__}: {e.msg if isinstance(e, SyntaxError) else e}") from None
            for key, value in scope.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                if key not in defaults:
                    raise ConfigError(f"{arg}: unknown key {key!r}; valid keys: {', '.join(sorted(defaults))}")
                config[key] = coerce(key, value, defaults[key])
            continue
        key, sep, raw = arg[2:].partition("=")
        if key not in defaults:
            raise ConfigError(f"unknown option --{key}; valid options: {', '.join('--' + k for k in sorted(defaults))}")
        if not sep:  # a bare --flag means True for a bool option
            if not isinstance(defaults[key], bool):
                raise ConfigError(f"--{key} needs a value (--{key}=...)")
            raw = "True"
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a plain string such as a path
        if isinstance(defaults[key], str) and not isinstance(value, str):
            value = raw  # --out_dir=123 stays a string
        config[key] = coerce(key, value, defaults[key])
    return config
