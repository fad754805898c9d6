"""
python tests/cli_cases.py CASES.json RESULTS.json: `python SCRIPT ARGS` for each case, all in this one
process (for test_bad_input.py: one interpreter start for dozens of cases). The script runs as __main__
each time, with file descriptors 1 and 2 sent to files, so its stderr is exactly what a user's terminal
shows (C-level writes and warnings included); an exception that escapes it is printed as the interpreter
would. CASES.json: [{"id", "script": train.py or eval.py, "argv": [...]}];
RESULTS.json: {id: {"code": exit status, "stderr": text}}.
"""
import json
import os
import runpy
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

cases_path, results_path = sys.argv[1:3]
with open(cases_path) as f:
    cases = json.load(f)
results, saved = {}, (os.dup(1), os.dup(2))
for case in cases:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        sys.argv, code = [case["script"], *case["argv"]], 0
        try:
            runpy.run_path(os.path.join(ROOT, case["script"]), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        err.seek(0)
        results[case["id"]] = {"code": code, "stderr": err.read()}
with open(results_path, "w") as f:
    json.dump(results, f)
