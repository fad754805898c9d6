"""
nanoGPT-style configuration: module-level defaults, overridden by config files and --key=value.

    python train.py config/llama2_7b_metamath_beamlora.py --r=32 --lr=1e-4

A config file is plain Python assigning some of the defaults (it is the user's own code, run with
exec as nanoGPT does). A --key=value is read as a Python literal when it parses as one (else as a
string) and must match the type of the default. An unknown key is an error listing the valid ones.

cli(main) is every script's entry point: main(sys.argv[1:]), with bad input reported as one line.

--help (or -h) prints the script's docstring and every option with its type, default and the comment
at the end of its line, grouped under the comment lines that head each group in the file: the
defaults block is the one place an option is documented.
"""
import ast
import io
import os
import sys
import tokenize
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


RANGES = {"at least 1": lambda v: v >= 1, "at least 2": lambda v: v >= 2, "positive": lambda v: v > 0,
          "0 or more": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1, "in [0, 1]": lambda v: 0 <= v <= 1,
          "in (0, 1)": lambda v: 0 < v < 1}


def check_range(cfg, what, *keys):
    """Each key's value must be `what` (a RANGES name): else one line naming the first that is not."""
    for key in keys:
        if not RANGES[what](cfg[key]):  # NaN fails every test
            raise ConfigError(f"--{key}={cfg[key]}: must be {what}")


def check_choice(cfg, key, allowed):
    if cfg[key] not in allowed:
        raise ConfigError(f"--{key}={cfg[key]}: must be one of {', '.join(allowed)}")


def documented(paths, defaults):
    """The defaults blocks of the file(s) at `paths` (a path or a list: train.py, then each method's module),
    parsed: [(heading, key, description)] for every key of `defaults`, in file order. description: the comment at
    the end of the key's line, with any indented comment lines right below it; heading: the unindented comment lines
    right above the key (a group's title), [] if none. A key no file assigns at module level comes last,
    undocumented."""
    rows = {}
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        comments, alone = {}, {}  # line -> comment text; line -> column, for lines that hold only a comment
        for t in tokenize.generate_tokens(io.StringIO(source).readline):  # a '#' inside a string is no comment
            if t.type == tokenize.COMMENT:
                comments[t.start[0]] = t.string[1:].strip()
                if not t.line[:t.start[1]].strip():
                    alone[t.start[0]] = t.start[1]
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id in defaults and node.targets[0].id not in rows:
                heading, line = [], node.lineno - 1
                while alone.get(line) == 0 and comments[line].strip("-"):  # up to a blank line, code or a # ---- rule
                    heading.insert(0, comments[line])
                    line -= 1
                desc = comments.get(node.end_lineno, "") if node.end_lineno not in alone else ""
                line = node.end_lineno + 1
                while desc and alone.get(line, 0) > 0:  # the description goes on, indented, on the lines below
                    desc, line = f"{desc} {comments[line]}", line + 1
                rows[node.targets[0].id] = (heading, node.targets[0].id, desc)
    return list(rows.values()) + [([], k, "") for k in defaults if k not in rows]


def help_text(path, defaults, doc_path=None):
    """--help: the docstring of `doc_path` (default: `path`, or its first file), then the options documented in
    `path` (a file or a list of files, as documented takes)."""
    with open(doc_path or (path if isinstance(path, str) else path[0]), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    show = {k: f"--{k}={v}" if v != "" else f'--{k}=""' for k, v in defaults.items()}
    width = min(32, max(map(len, show.values())))
    out = [doc, "", "options: --key=value (a bare --flag sets a bool to True), after any config files (python "
           "files assigning some of them); each with its type and default"]
    for heading, key, desc in documented(path, defaults):
        out += ["", *(f"# {h}" for h in heading)] if heading else []
        flag, kind = show[key], type(defaults[key]).__name__
        out.append(f"  {flag:<{width}}  {kind:<5}  {desc}" if len(flag) <= width else
                   f"  {flag}\n  {'':<{width}}  {kind:<5}  {desc}")
    return "\n".join(out)


def parse_args(argv, defaults, path=None, doc_path=None):
    """Returns a copy of `defaults` (a dict) updated by the config files and --key=value in argv. With `path`
    (the file or files whose defaults blocks document `defaults`), --help or -h prints help_text and exits 0."""
    if path and ("--help" in argv or "-h" in argv):
        print(help_text(path, defaults, doc_path))
        sys.exit(0)
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
                what = e.msg if isinstance(e, SyntaxError) else e
                raise ConfigError(f"{arg}:{line}: {type(e).__name__}: {what}") from None
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


def cli(main, errors=(ValueError, OSError), code=lambda e: 1):
    """Run main(sys.argv[1:]) as a script: an error of `errors` (bad input: ConfigError is a ValueError) is one
    `error: ...` line on stderr and exit code(e), no traceback (BEAMLORA_DEBUG=1 shows it); Ctrl-C exits 130."""
    try:
        main(sys.argv[1:])
    except errors as e:
        if os.environ.get("BEAMLORA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(code(e))
    except KeyboardInterrupt:
        sys.exit(130)
