"""Collectives per step for every variant under every parallelism (compiled HLO counts).

Usage: python benchmarks/collectives.py [--out benchmarks/COLLECTIVES.md]

Runs on 8 simulated CPU devices over the sharding registry of the test suite
(``tests/sharding_registry.py``) and counts, in the compiled HLO of one training
step, the all-reduce, all-gather, reduce-scatter, collective-permute and
all-to-all operations. A cell reads ``AR/AG/RS`` (all-reduce / all-gather /
reduce-scatter; the other two kinds are listed when present).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=None, help="write a Markdown table here")
  parser.add_argument("--variants", default=None, help="comma-separated registry names")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  jax.config.update("jax_num_cpu_devices", 8)
  sys.path.insert(0, str(ROOT))
  from tests import sharding_registry as reg
  from tests import test_sharding as suite

  names = args.variants.split(",") if args.variants else sorted(reg.VARIANTS)
  header = "| variant | " + " | ".join(suite.MODES) + " |"
  lines = [header, "|" + "---|" * (len(suite.MODES) + 1)]
  for name in names:
    cells = []
    for mode in suite.MODES:
      counts = suite.collective_counts(name, mode)
      cell = f"{counts['all-reduce']}/{counts['all-gather']}/{counts['reduce-scatter']}"
      extra = [f"{k} {v}" for k, v in counts.items() if k in suite.COLLECTIVES[3:] and v]
      cells.append(cell + (f" ({', '.join(extra)})" if extra else ""))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print(lines[-1], flush=True)
  if args.out:
    args.out.write_text(
      "# Collectives per training step\n\n"
      "Compiled HLO of one step on 8 simulated CPU devices (`python benchmarks/collectives.py"
      " --out benchmarks/COLLECTIVES.md`). Cells: all-reduce / all-gather / reduce-scatter."
      "\n\n" + "\n".join(lines) + "\n"
    )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
