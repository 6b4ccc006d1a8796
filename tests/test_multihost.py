"""Two processes (jax.distributed, gloo) run mSAM and synced SAM on one global mesh.

They run ``jax.shard_map`` with JAX's defaults (replication checking) and must
match the single-process reference; a configuration that differs between the
processes (LookSAM's ``k``) is refused at init on both.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import helpers
from tests.test_msam import STEPS, global_batches, np_msam_run

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
DEVICES = 2 * PROCESSES  # tests/multihost_worker.py gives each process 2 CPU devices


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_the_single_process_reference(tmp_path):
  out = tmp_path / "params.npz"
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  workers = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "tests.multihost_worker",
        str(i),
        str(PROCESSES),
        str(port),
        str(out),
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(PROCESSES)
  ]
  logs = []
  for worker in workers:
    try:
      logs.append(worker.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for w in workers:
        w.kill()
      pytest.fail("a multi-host worker did not finish in 240 s")
  for worker, log in zip(workers, logs, strict=True):
    assert worker.returncode == 0, log[-3000:]

  for i in range(PROCESSES):
    raised = str(np.load(f"{out}.{i}.npz")["raised"])
    assert "processes of this jax.distributed run built different optimizer" in raised, raised
  saved = np.load(f"{out}.0.npz")
  params = helpers.make_problem(0)[0]
  batches = global_batches(STEPS)
  expected = {
    "msam": np_msam_run(params, batches, DEVICES),  # one eps per device
    "sam": np_msam_run(params, batches, 1),  # one global eps
  }
  for name, reference in expected.items():
    actual = {k: saved[f"{name}/{k}"] for k in reference}
    assert helpers.relative_error(actual, reference) < 1e-5, name
