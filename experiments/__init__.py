"""What measures or researches deep_fusion.py, importing it (never copying it):

  benchmark.py     augmentation and training-step throughput of both heads
  ablations.py     fixed attention, own optimizer or weight decay, first-commit blocks: another build
  authors_eval.py  the authors' transductive head-output 1-NN on finished runs
  table.py         a named results table: arms x seeds, one run after the other, into Markdown + JSON
  figure.py        a run's attention, labelled: token maps by class and class-to-class matrices
  theory.py        the objects of THEORY.md's two theorems, for the notebook and the tests

Run each from the project root, e.g. `python experiments/benchmark.py --device cpu`; each takes
deep_fusion.py's flags and adds its own.
"""

import sys
from pathlib import Path

import deep_fusion as df


def own_flags(argv, *flags):
    """Take a script's own flags, each (name, argparse keywords), out of argv. Returns (their
    values, the rest for deep_fusion.main); a mistake is one line on stderr and exit 2, as there."""
    parser = df.Parser(add_help=False, allow_abbrev=False)
    for name, kwargs in flags:
        parser.add_argument(name, **kwargs)
    try:
        return parser.parse_known_args(argv)
    except df.DeepFusionError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
