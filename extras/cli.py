"""The command line's plumbing, shared by facesynth.py, evaluate.py and the extras: every expected
failure as one `error:` line (fail, one_line_errors), argparse that shows defaults and suggests the
nearest option for a typo (ArgParser), checked numbers (number), output locations checked before any
computing (writable), evaluate's default run (latest_run), short run names (labels) and its terminal
table (short_table). The paper's code had none of it: a bad option was a traceback hours in.
"""
import argparse
import contextlib
import difflib
import glob
import math
import os
import re
import sys

from data import DataError, WriteError


def writable(path, folder=False):
    """Checked before any computing: the file `path` (or the folder, with `folder`) can be written: the
    nearest of it and the folders above that exists is a folder we may write."""
    up = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up) or not os.access(up, os.W_OK | os.X_OK):
        why = "is a file, not a folder" if not os.path.isdir(up) else "is not writable"
        raise WriteError(f"{path}: cannot write there ({up} {why})")
    return path


def fail(msg):
    """A user-facing error: one line on stderr, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors():
    """A verb's expected failures as one `error:` line (fail): bad input, a NaN loss, a write that no
    helper wraps (log.csv's rows on a full disk), running out of memory. Anything else is a bug and
    keeps its traceback."""
    try:
        yield
    except (DataError, FloatingPointError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename or 'a file'}: {e.strerror or e}")
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError, or the CPU allocator's RuntimeError
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        size = re.search(r"[Tt]ried to allocate ([\d.]+ ?[A-Za-z]+)", str(e))
        fail(f"out of memory{f' (allocating {size[1]})' if size else ''}; use a smaller --batch-size, "
             "--ngf or --ndf")


class ArgParser(argparse.ArgumentParser):
    """argparse with every option's default in --help, and its usage errors as the same one line
    `error: ...` as every other error."""

    def __init__(self, *a, **k):
        super().__init__(*a, formatter_class=argparse.RawDescriptionHelpFormatter, **k)

    def add_argument(self, *a, **k):
        d = k.get("default")
        shown = d is not None and d is not False and d not in ([], argparse.SUPPRESS)  # 0 is shown
        if a[0].startswith("-") and shown and "default" not in k.get("help", ""):
            k["help"] = (k.get("help", "") + " (default: %(default)s)").strip()  # read when --help prints
        return super().add_argument(*a, **k)

    def parse_known_args(self, args=None, namespace=None):
        self.argv = sys.argv[1:] if args is None else list(args)  # error() looks for the verb in it
        return super().parse_known_args(args, namespace)

    def error(self, message):
        fail(message + self.did_you_mean(message))

    def did_you_mean(self, message):
        """' (did you mean --batch-size?)' for a mistyped option or verb: the nearest of the parser's own
        (difflib's ratio >= 0.6); argparse's suggest_on_error only arrives with Python 3.14."""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            words, names = [choice[1]], re.findall(r"'([^']*)'", choice[2])
        else:  # an option no prefix of which is known, in the message or (a required one missing) the line
            verbs = [a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            typed = next((vs[w] for vs in verbs for w in getattr(self, "argv", []) if w in vs), self)
            names = [o for a in typed._actions for o in a.option_strings]
            unknown = re.search(r"unrecognized arguments: (.*)", message)
            words = [w.split("=")[0] for w in (unknown[1].split() if unknown else getattr(self, "argv", []))]
            words = [w for w in words if w.startswith("--") and not any(n.startswith(w) for n in names)]
        hits = [h[0] for w in words for h in [difflib.get_close_matches(w, names, 1)] if h]
        return f" (did you mean {' '.join(hits)}?)" if hits else ""


def number(kind=int, low=1, above=False, high=None):
    """An argparse type: a finite `kind` (int or float) of at least `low`, or above it, and at most `high`
    (where memory runs out long before)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' * (kind is int)}number") from None
        if not math.isfinite(v) or v < low or (above and v == low):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be "
                                             f"{'above' if above else 'at least'} {low}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: at most {high} (memory runs out)")
        return v
    return parse


def given_options(parser, argv):
    """Which options the user typed in `argv` (resume may only change some of them): argv parsed once more
    into a namespace whose every option is already None, which argparse then leaves alone unless typed."""
    every = dict.fromkeys(vars(parser.parse_args(argv)))  # every option's name, each None
    typed = parser.parse_args(argv, argparse.Namespace(**every))
    return {k for k, v in vars(typed).items() if v is not None}


def labels(run_dirs):
    """Short unique run names: the paths below their common folder (runs/abl/full/s0 -> full-s0)."""
    paths = [os.path.abspath(r) for r in run_dirs]
    base = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return [os.path.relpath(p, base).replace(os.sep, "-") if p != base else os.path.basename(p)
            for p in paths]


def latest_run(root="runs"):
    """evaluate's --runs left out: the run under root whose checkpoint was written last, said aloud."""
    found = glob.glob(os.path.join(root, "**", "ckpt.pt"), recursive=True)
    if not found:
        raise DataError(f"no trained run under {root}/ yet: train one first (python facesynth.py train "
                        f"--steps 200 --out {root}/short), or name runs with --runs")
    run = os.path.dirname(max(found, key=os.path.getmtime))
    print(f"--runs not given: the most recent run, {run}")
    return [run]


def columns(cols, width):
    """Plain-text columns (each a heading, then a cell per row) side by side within `width` characters,
    the first left-aligned, the rest right-aligned, as many as fit from the left, with a rule under the
    headings. Returns (the text, how many columns it shows)."""
    shown = cols[:1]
    for col in cols[1:]:
        if sum(max(map(len, c)) + 2 for c in shown + [col]) > width:
            break
        shown.append(col)
    w = [max(map(len, c)) for c in shown]
    line = lambda i: "  ".join(c[i].ljust(w[j]) if j == 0 else c[i].rjust(w[j]) for j, c in enumerate(shown))
    rows = [line(i).rstrip() for i in range(len(shown[0]))]
    return "\n".join(rows[:1] + ["-" * len(rows[0])] + rows[1:]), len(shown)


def cell(s):
    """[mean, low, high] as mean±half the interval, both to the half's first significant digit: 14.9±0.5,
    0.674±0.009; a mean alone where there is no interval."""
    h = (s[2] - s[1]) / 2
    if not math.isfinite(h) or h <= 0:
        return f"{s[0]:.3g}"
    d = max(0, -math.floor(math.log10(h)))
    return f"{s[0]:.{d}f}±{h:.{d}f}"


def short_table(models, first, width):
    """evaluate's terminal table: a row per (name, {"summary": {metric: [mean, low, high]}}), a column per
    metric, `first`'s metrics first, the others while they fit in `width`. Returns (the text, the
    metrics left out)."""
    keys = list(dict.fromkeys(k for _, r in models for k in r["summary"]))
    keys = sorted(keys, key=lambda k: first.index(k) if k in first else len(first))
    cols = [[k] + [cell(r["summary"][k]) if k in r["summary"] else "-" for _, r in models] for k in keys]
    text, shown = columns([["run"] + [n[-24:] for n, _ in models]] + cols, width)
    return text, keys[shown - 1:]
