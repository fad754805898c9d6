"""
Where a rankbench interval's width comes from: the facts a run happens to learn, or the run as a whole.

    python bench/rankbench_noise.py                                   # out/rankbench/test, r = 8, against lora
    python bench/rankbench_noise.py --runs_dir=out/rb_pilot/val --methods=lrlora,dora

For every method with runs at --rank for the same seeds as --baseline, from the runs' scored problems
(run_dir/eval/gsm8k_samples.jsonl, one row per held-out problem, in the same order for every run):
- the paired difference's mean and its sd over seeds (what the table's interval is made of);
- the fact-level standard error of one seed's difference: the problems grouped by the stall they ask, so the
  sampling noise of which facts a run learnt, within one run, with nothing of the run as a whole in it;
- how much two runs agree on which facts they learnt (phi of the per-fact scores), same seed and other seeds.
- what that target half-width would take: the run part of the sd (what is left of it after the fact-level error,
  which more facts or problems cannot remove), the seeds it needs at today's sd, and the effective facts it needs at
  --table_seeds (none if the run part alone is too wide).
If the seeds' sd is about the fact-level error, the width is set by the number of facts and by how
independently runs pick the ones they learn; a smaller interval needs more facts or facts whose learning the data
decides (docs/RANKBENCH.md). Numbers to stdout and --out (JSON).
"""
import collections
import glob
import itertools
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import compare  # noqa: E402
from configurator import ConfigError, cli, parse_args  # noqa: E402

DEFAULTS = dict(
    runs_dir="out/rankbench/test",  # bench/rankbench.py's run folders of one split
    rank=8,  # the runs at this rank
    baseline="lora",  # differences are taken to this method
    methods="lrlora,dora,relora,milora,beamlora",  # the methods compared to it
    out="",  # also write the numbers here (JSON)
    target=1.5,  # points: the half-width of the 95% interval wanted (issue 27: 1.5)
    table_seeds=5,  # seeds of the table that target is for
)


def asked_pattern():
    """The generator's own pattern for the stall a question asks (data/rankbench/generate.py's ASKED)."""
    import rankbench
    return rankbench.generator().ASKED


def runs(runs_dir, label, rank, asked_re):
    """{seed: [(stall, correct)] per scored problem} of one method's runs at rank."""
    out = {}
    for spec_path in sorted(glob.glob(os.path.join(runs_dir, "*", "spec.json"))):
        with open(spec_path) as f:
            spec = json.load(f)
        samples = os.path.join(os.path.dirname(spec_path), "eval", "gsm8k_samples.jsonl")
        if spec["label"] != label or spec.get("r") != rank or not os.path.isfile(samples):
            continue
        if spec["seed"] in out:
            raise ConfigError(f"--runs_dir={runs_dir}: two {label} runs at r = {rank}, seed {spec['seed']} (runs of "
                              "other settings or code): give a folder with one run per seed")
        with open(samples) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        asked = [asked_re.search(r["prompt"]) for r in rows]
        if not all(asked):
            raise ConfigError(f"{samples}: a prompt without a rankbench question")
        out[spec["seed"]] = [(int(a.group(1)), bool(r["correct"])) for a, r in zip(asked, rows)]
    return out


def per_fact(problems):
    """{stall: share of its problems right}"""
    got = collections.defaultdict(list)
    for stall, ok in problems:
        got[stall].append(ok)
    return {s: sum(v) / len(v) for s, v in got.items()}


def phi(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b)) / n
    va, vb = sum((x - ma) ** 2 for x in a) / n, sum((y - mb) ** 2 for y in b) / n
    return cov / (va * vb) ** 0.5 if va and vb else float("nan")


def fact_se(base, other):
    """Points: the standard error of one seed's paired difference over the problems, clustered by fact."""
    n, sums = len(base), collections.defaultdict(float)
    count = collections.Counter(s for s, _ in base)
    for (stall, x), (_, y) in zip(base, other):
        sums[stall] += y - x
    mean = sum(sums.values()) / n
    return 100 * sum((v - mean * count[s]) ** 2 for s, v in sums.items()) ** 0.5 / n


def needs(sd, fact_sd, facts, target, table_seeds):
    """-> (run part of the sd, seeds for a half-width of target at sd, effective facts for it at table_seeds seeds,
    None if no number of facts can: the run part alone is wider). The fact-level variance falls as 1/facts."""
    run = max(0.0, sd * sd - fact_sd * fact_sd) ** 0.5
    start = max(2, math.ceil((1.959963 * sd / target) ** 2))  # t > z = 1.95996...: no fewer seeds can do
    seeds = next(n for n in itertools.count(start) if compare.t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= target)
    allowed = target * math.sqrt(table_seeds) / compare.t_quantile(0.975, table_seeds - 1)  # the sd it can have
    more = None if run >= allowed else facts * fact_sd ** 2 / (allowed ** 2 - run ** 2)
    return run, seeds, more


def main(argv):
    cfg = parse_args(argv, DEFAULTS, __file__)
    if cfg["target"] <= 0 or cfg["table_seeds"] < 2:
        raise ConfigError("--target must be > 0 and --table_seeds >= 2")
    asked_re = asked_pattern()
    base = runs(cfg["runs_dir"], cfg["baseline"], cfg["rank"], asked_re)
    if len(base) < 2:
        raise ConfigError(f"--runs_dir={cfg['runs_dir']}: fewer than 2 scored {cfg['baseline']} runs at r = "
                          f"{cfg['rank']}")
    first = next(iter(base.values()))
    count = collections.Counter(s for s, _ in first)
    facts = sorted(count)
    effective = len(first) ** 2 / sum(c * c for c in count.values())
    out = {"facts": len(facts), "effective_facts": round(effective, 1), "problems": len(first), "methods": {}}
    print(f"{len(first)} problems on {len(facts)} facts ({effective:.0f} effective: the problems per fact differ)")
    for m in [m.strip() for m in cfg["methods"].split(",") if m.strip()]:
        other = runs(cfg["runs_dir"], m, cfg["rank"], asked_re)
        seeds = sorted(set(base) & set(other))
        if any([st for st, _ in other[s]] != [st for st, _ in base[s]] for s in seeds):
            raise ConfigError(f"--runs_dir={cfg['runs_dir']}: {m} and {cfg['baseline']} runs scored different problems")
        if len(seeds) < 2:
            print(f"  {m}: fewer than 2 seeds paired to {cfg['baseline']}; skipped")
            continue
        acc = {k: {s: 100 * sum(ok for _, ok in v[s]) / len(v[s]) for s in seeds} for k, v in (("b", base),
                                                                                                ("m", other))}
        diffs = [acc["m"][s] - acc["b"][s] for s in seeds]
        fb = {s: per_fact(base[s]) for s in seeds}
        fm = {s: per_fact(other[s]) for s in seeds}
        same = [phi([fb[s][k] for k in facts], [fm[s][k] for k in facts]) for s in seeds]
        cross = [phi([fb[s][k] for k in facts], [fm[t][k] for k in facts]) for s in seeds for t in seeds if s != t]
        row = {"seeds": len(seeds), "diff_mean": statistics.mean(diffs), "diff_sd": statistics.stdev(diffs),
               "fact_se": statistics.mean(fact_se(base[s], other[s]) for s in seeds),
               "phi_same_seed": statistics.mean(same), "phi_other_seeds": statistics.mean(cross)}
        row["run_sd"], row["seeds_needed"], row["facts_needed"] = needs(
            row["diff_sd"], row["fact_se"], effective, cfg["target"], cfg["table_seeds"])
        out["methods"][m] = row
        print(f"  {m} - {cfg['baseline']}: {row['diff_mean']:+.1f}, sd over {len(seeds)} seeds {row['diff_sd']:.2f}"
              f" | fact-level se of one seed {row['fact_se']:.2f} | facts agree: phi {row['phi_same_seed']:.2f} "
              f"same seed, {row['phi_other_seeds']:.2f} other seeds")
        more = "no number of facts" if row["facts_needed"] is None else f"{row['facts_needed']:.0f} effective facts"
        print(f"    run part {row['run_sd']:.2f}; a half-width of {cfg['target']}: {row['seeds_needed']} seeds at this "
              f"sd, or at {cfg['table_seeds']} seeds {more}")
    if cfg["out"]:
        with open(cfg["out"], "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    cli(main, errors=(ConfigError, OSError))
