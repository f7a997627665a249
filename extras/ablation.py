"""The ablation study beyond the paper's four eyeballed runs: every ablation trained over several seeds,
all scored on the same held-out pairs, and each compared with `full` by a paired sign-flip test
(Bonferroni over the table) in REPORT.md. `python facesynth.py ablation` runs it with facesynth's own
train and resume check; evaluate.py scores the runs and draws the figures.
"""
import os

import numpy as np

import data
from data import DataError
from evaluate import N_EVAL, SEED, fmt, heatmap_figure, loss_figures, mean_ci, metrics, save_metrics, table
from extras import synthetic, yardsticks
from extras.cli import number
from extras.runs import SCHEDULE, SESSION, holds_run, resumed
from losses import TERMS

N_PERM = 10000  # sign flips in the paired permutation test
# The paper's four runs (Fig. 2/3), and with --single one run per term switched off.
GROUP_RUNS = {"full": [], "no_pix": ["pix"], "no_consistency": ["consistency"], "no_feature": ["feature"]}


def sign_flip_p(d, n=N_PERM, seed=SEED):
    """Two-sided paired permutation test of mean(d) = 0: under H0 (the two sides are exchangeable on
    every pair) each difference's sign is a coin toss. p = (1 + #{|flipped sum| >= |sum|}) / (n + 1)."""
    d = np.asarray(d, dtype=np.float64)
    flips = np.random.default_rng(seed).choice((-1.0, 1.0), size=(n, len(d)))
    return float((1 + np.sum(np.abs(flips @ d) >= abs(d.sum()) - 1e-9)) / (n + 1))


def write_report(groups, out_dir, split=None, data_root=None, n_pairs=N_EVAL, seed=SEED, device="cpu"):
    """REPORT.md for groups = {"full": [run dirs, one per seed], "no_pix": [...], ...}: the group table,
    each group's difference from "full" with p-values, every run, the figures. Returns its path."""
    run_dirs = [r for rs in groups.values() for r in rs]
    m = metrics(run_dirs, split, data_root, n_pairs, seed, device)
    runs, per_run = m["runs"], save_metrics(m, out_dir)
    if len({(r["data"], r["split"]) for r in runs.values()}) > 1:
        raise DataError(f"{out_dir}: the runs were scored on different datasets; "
                        "pass data_root= to compare them")
    figures = [*loss_figures(run_dirs, out_dir), heatmap_figure([rs[0] for rs in groups.values()], out_dir,
                                                                split, data_root, seed=seed, device=device)]
    # every metric over all pairs, and L1/PSNR/SSIM over the third of the pairs that move most
    keys = list(dict.fromkeys(k for r in runs.values() for k in r["summary"]
                              if k in r["pairs"] or k.endswith("_large")))
    large = yardsticks.thirds(np.array(list(m["motion"].values())[0]["pairs"]))[1]["large"]
    per_pair = lambda r, k: (np.asarray(runs[r]["pairs"][k.removesuffix("_large")])[large]
                             if k.endswith("_large") else np.asarray(runs[r]["pairs"][k]))
    # A group's score: the mean over its seeds of each run's mean over pairs; its interval a t-interval
    # over seeds (the training randomness) with >= 2 seeds, else over the pairs of its one run.
    cell = lambda rs, k: fmt(mean_ci([runs[r]["summary"][k][0] for r in rs]) if len(rs) > 1
                             else runs[rs[0]]["summary"][k])
    floor = [[name, "-"] + [fmt(b["summary"][k]) if k in b["summary"] else "-" for k in keys]
             for name, b in m["baselines"].items()]
    text = [f"# Ablation report\n\nSplit `{m['split']}`, {n_pairs} source/target pairs (seed {seed}), the "
            f"same for every run; judge: {m['judge']}. L1: mean |generated - target|, 0-255 (lower is "
            "better); PSNR: dB; SSIM: 11x11 Gaussian; _large: over the third of the pairs that move most. "
            "`copy` and `warp` are the floor, no training (extras/yardsticks.py). Synthetic set: x_ = "
            "identity A driven by B's pose/expression vs its rendered truth, xabs_ = conditioned on B's own "
            "landmarks instead (the paper's use), leak_ = share of B's glasses/beard pixels copied onto A "
            "(lower is better; see extras/synthetic.py: leak_score).\n",
            "## Groups: mean over seeds [95 % t-interval over seeds; over pairs for a single seed]\n",
            table(["group", "seeds"] + keys, floor + [[g, str(len(rs))] + [cell(rs, k) for k in keys]
                                                      for g, rs in groups.items()])]
    if "full" in groups and len(groups) > 1:
        # Paired over the shared pairs: d_i = ablation - full on pair i, each side averaged over its
        # seeds; a two-sided sign-flip permutation test; Bonferroni over every cell of the table. It asks
        # "do these (seed-averaged) models differ on this data?"; the spread over seeds is the group table's.
        tests = len(keys) * (len(groups) - 1)
        avg = lambda rs, k: np.mean([per_pair(r, k) for r in rs], axis=0)
        others = [g for g in groups if g != "full"]
        diff = {(g, k): avg(groups[g], k) - avg(groups["full"], k) for g in others for k in keys}
        p = {gk: sign_flip_p(d) for gk, d in diff.items()}
        rows = [[g] + [f"{diff[g, k].mean():+.3g} (p={p[g, k]:.2g})" + " *" * (p[g, k] < 0.05 / tests)
                       for k in keys]
                for g in others]
        text += [f"\n## Differences from `full` (ablation - full, mean over pairs; p: paired sign-flip test, "
                 f"{N_PERM} flips, seeds averaged first; * = significant at 0.05 / {tests}, Bonferroni)\n",
                 table(["group"] + keys, rows)]
    text += ["\n## Every run: mean [95 % t-interval over pairs]\n", per_run, "\n## Figures\n"]
    text += [f"![{os.path.basename(path)}]({os.path.relpath(path, out_dir)})\n" for path in figures]
    with data.writing(os.path.join(out_dir, "REPORT.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(text))
    return os.path.join(out_dir, "REPORT.md")


def study(args, train):
    """`facesynth.py ablation`: train every ablation over --seeds seeds into OUT/NAME/seedK (finished
    runs are skipped, a cut one resumes), then evaluate them all and write OUT/REPORT.md. train:
    facesynth's (a run's loop, train(options, the options typed))."""
    root, n_seeds, single = args["out"], args["seeds"], args["single"]
    args = {k: v for k, v in args.items() if k not in ("out", "seeds", "single")}  # each run's own options
    runs = {name: {"ablate": groups} for name, groups in GROUP_RUNS.items()}
    if single:
        runs.update({f"no_{t}": {f"lambda_{t}": 0.0} for t in TERMS})
    args["data"] = args["data"] or synthetic.ensure_synthetic(synthetic.SYNTH_CACHE)
    total = args["steps"] or args["epochs"] * data.steps_per_epoch(args)
    dirs = {name: [os.path.join(root, name, f"seed{seed}") for seed in range(n_seeds)] for name in runs}
    given = set(args) - SESSION - SCHEDULE - {"split", "resume"}  # every option must be the runs' own
    steps = {}
    for name, change in runs.items():  # all checked before any training: one REPORT, one set of options
        for seed, out in enumerate(dirs[name]):
            if holds_run(out):  # as --resume checks it, with every option typed
                mine = {**args, **change, "seed": seed, "out": out, "resume": out}
                _, _, ckpt = resumed(mine, given | set(change) | {"seed"})
                steps[out] = ckpt["step"]
    for i, (name, change) in enumerate(runs.items()):
        for seed, out in enumerate(dirs[name]):
            done = steps.get(out, 0)
            print(f"ablation {name} seed {seed} ({i * n_seeds + seed + 1}/{len(runs) * n_seeds}): "
                  + ("finished, skipped" if done >= total else f"training from step {done}"), flush=True)
            if done >= total:
                continue
            run = {**args, **change, "seed": seed, "out": out, "steps": total}
            train({**run, "resume": out} if done else run, {"steps"} if done else set())
    report = write_report(dirs, root, split=args.get("split"), data_root=args["data"])
    print(f"ablation: {len(runs)} runs x {n_seeds} seeds in {root}/; report {report}")
    return report


def add_options(p):
    """`facesynth.py ablation`'s own options, after train's."""
    p.set_defaults(out=os.path.join("runs", "ablation"))
    p.add_argument("--seeds", type=number(), default=3, help="runs per ablation, seeds 0 .. N-1")
    p.add_argument("--single", action="store_true", help="also the six single-term ablations")
    p.add_argument("--split", help="test split to evaluate (default: the first with videos)")
