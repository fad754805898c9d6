"""
What every data/<name>/prepare.py shares: fetch a pinned file (or read a copy downloaded by hand),
check its sha256, parse JSON / JSONL / gzipped JSONL, convert, and write JSONL atomically.
Standard library only, so the data can be made before anything else is installed.

    python data/gsm8k/prepare.py                                  # download, write data/gsm8k/*.jsonl
    python data/gsm8k/prepare.py --only=test.jsonl --src=FILE     # offline: convert a file you fetched
    python data/gsm8k/prepare.py --only=test.jsonl --url=MIRROR   # same file from a mirror (still checked)
"""
import argparse
import gzip
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request


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
    parser = argparse.ArgumentParser(description=f"Make {', '.join(files)} (see data/README.md).")
    parser.add_argument("--only", choices=list(files), help="make only this output")
    parser.add_argument("--src", help="convert this local file instead of downloading (offline use)")
    parser.add_argument("--url", help="download from this URL instead, e.g. a mirror (sha256 still checked)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(script)),
                        help="output folder (default: next to this script)")
    args = parser.parse_args()
    names = [args.only] if args.only else list(files)
    if (args.src or args.url) and len(names) > 1:
        fail(f"--src and --url name one file; add --only=NAME, NAME one of: {', '.join(names)}")
    for name in names:
        url, sha256 = files[name]
        retry_hint = f"python {os.path.relpath(script)}" + (f" --only={name}" if len(files) > 1 else "")
        if args.src:
            if not os.path.isfile(args.src):
                fail(f"{args.src}: no such file")
            origin = args.src
            with open(args.src, "rb") as f:
                data = f.read()
        else:
            origin = args.url or url
            data = download(origin, retry_hint)
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is None:
            print(f"sha256 {digest} (none pinned for this file)")
        elif digest != sha256 and not args.src:
            fail(f"{origin}: sha256 {digest} is not the pinned {sha256}; nothing written")
        elif digest != sha256:  # a file chosen by hand may be another version or mirror: say so, go on
            print(f"note: {origin} is not the pinned file (sha256 {digest}, pinned {sha256}); "
                  "converting it anyway", file=sys.stderr)
        records = parse(data, origin)
        try:
            rows = convert(records)
        except KeyError as e:
            fail(f"{origin}: a record has no field {e}")
        path = os.path.join(args.out, name)
        write_jsonl(rows, path)
        print(f"{origin}: {len(records):,} records -> {len(rows):,} rows in {path}")
