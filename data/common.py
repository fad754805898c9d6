"""
What every data/<name>/prepare.py shares: fetch a pinned file (or read a copy downloaded by hand),
check its sha256, parse JSON / JSONL / gzipped JSONL, convert, and write JSONL atomically.
Standard library only, so the data can be made before anything else is installed.

    python data/gsm8k/prepare.py                                  # download, write data/gsm8k/*.jsonl
    python data/gsm8k/prepare.py --only=test.jsonl --src=FILE     # offline: convert a file you fetched
    python data/gsm8k/prepare.py --only=test.jsonl --url=MIRROR   # same file from a mirror (still checked)
"""
import gzip
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request

# configurator.py, standard library only
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ConfigError, parse_args  # noqa: E402

# -----------------------------------------------------------------------------
# the options of every data/<name>/prepare.py, overridden by --key=value (see configurator.py)
only = ""  # make only this one of the script's outputs (its docstring lists them); "": all
src = ""  # convert this local file instead of downloading (offline use; with several outputs, needs --only)
url = ""  # download from this URL instead, e.g. a mirror (sha256 still checked)
out = ""  # output folder; "": next to the script
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
# -----------------------------------------------------------------------------


def fail(message):
    sys.exit(f"error: {message}")  # one line on stderr, exit status 1, no traceback


def pick(records, *fields):
    return [{k: r[k] for k in fields} for r in records]


def parse(data, origin):
    try:
        if data[:2] == b"\x1f\x8b":  # gzip magic: HumanEval ships as .jsonl.gz
            data = gzip.decompress(data)
        text = data.decode("utf-8")
        if text.lstrip().startswith("["):  # one JSON array (MetaMathQA, LLM-Adapters)
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as e:  # bad gzip, bad UTF-8 and bad JSON all land here
        fail(f"{origin}: not JSON, JSONL or gzipped JSONL ({e})")


def download(url, retry_hint):
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError; a timeout is an OSError
        reason = getattr(e, "reason", e)
        fail(f"cannot download {url} ({reason}). Offline? Download that URL by hand to a file, "
             f"then run: {retry_hint} --src=FILE")


def write_jsonl(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # same folder, so the rename below is atomic
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prepare(script, files, convert):
    """files: {output path relative to --out: (pinned url, sha256 or None)}; convert: records -> rows."""
    try:
        cfg = parse_args(sys.argv[1:], DEFAULTS, __file__, doc_path=script)  # --help: the script's docstring
    except ConfigError as e:
        fail(e)
    if cfg["only"] and cfg["only"] not in files:
        fail(f"--only={cfg['only']}: not an output of this script; one of: {', '.join(files)}")
    names = [cfg["only"]] if cfg["only"] else list(files)
    if (cfg["src"] or cfg["url"]) and len(names) > 1:
        fail(f"--src and --url name one file; add --only=NAME, NAME one of: {', '.join(names)}")
    for name in names:
        url, sha256 = files[name]
        retry_hint = f"python {os.path.relpath(script)}" + (f" --only={name}" if len(files) > 1 else "")
        if cfg["src"]:
            if not os.path.isfile(cfg["src"]):
                fail(f"{cfg['src']}: no such file")
            origin = cfg["src"]
            with open(cfg["src"], "rb") as f:
                data = f.read()
        else:
            origin = cfg["url"] or url
            data = download(origin, retry_hint)
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is None:
            print(f"sha256 {digest} (none pinned for this file)")
        elif digest != sha256 and not cfg["src"]:
            fail(f"{origin}: sha256 {digest} is not the pinned {sha256}; nothing written")
        elif digest != sha256:  # a file chosen by hand may be another version or mirror: say so, go on
            print(f"note: {origin} is not the pinned file (sha256 {digest}, pinned {sha256}); "
                  "converting it anyway", file=sys.stderr)
        records = parse(data, origin)
        try:
            rows = convert(records)
        except KeyError as e:
            fail(f"{origin}: a record has no field {e}")
        path = os.path.join(cfg["out"] or os.path.dirname(os.path.abspath(script)), name)
        write_jsonl(rows, path)
        print(f"{origin}: {len(records):,} records -> {len(rows):,} rows in {path}")
