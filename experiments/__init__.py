"""What measures or researches deep_fusion.py, importing it (never copying it):

  benchmark.py     augmentation and training-step throughput of both heads
  ablations.py     fixed attention, own optimizer or weight decay, first-commit blocks: another build
  authors_eval.py  the authors' transductive head-output 1-NN on finished runs
  table.py         a named results table: arms x seeds, one run after the other, into Markdown + JSON
  figure.py        a run's attention, labelled: token maps by class and class-to-class matrices
  fusion.py        the backbone and token controls, row entropy, class-to-class matrices, per-head scores
  theory.py        the objects of the two theorems (the notebook's sections 3 and 4), for the notebook and tests
  learned.py       the minimal setting: the head alone on generated subspace data; its grid, the SGD sweep
  constructed.py   Deep Fusion's strong form built by hand, against the cosine and the Bayes oracle

Run each from the project root, e.g. `python experiments/benchmark.py --device cpu`. benchmark.py and
ablations.py take deep_fusion.py's flags and add their own; authors_eval.py and figure.py take run folders;
table.py takes a table's name and, after `--`, deep_fusion.py's flags for every run. Results: README.md here.
"""

import sys
from pathlib import Path

import deep_fusion as df


def own_flags(argv, *flags, rest=True):
    """Parse a script's own flags, each (name, argparse keywords), from argv. Returns (their values, the rest of argv
    for deep_fusion.main); with rest=False every argument must be the script's own (and --help is its own). A
    mistake is one line on stderr and exit 2, as in deep_fusion.main."""
    parser = df.Parser(add_help=not rest, allow_abbrev=False, prog=Path(sys.argv[0]).name)
    for name, kwargs in flags:
        parser.add_argument(name, **kwargs)
    try:
        return parser.parse_known_args(argv) if rest else (parser.parse_args(argv), [])
    except df.DeepFusionError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
