"""The kernels' own account of how they ran (pysparse.ops.kernel_stats) and thread pinning
(pysparse.pin_threads): the observables behind bench/decode.py's thread columns.

The decode-speed question they answer: the 2:4 kernels are compute-bound per thread at batch 1,
so a team whose two threads share one CPU runs them at half speed; kernel_stats counts such
regions, and pinned threads cannot share a CPU. Each scenario runs in a fresh interpreter, started
both as a script and through runpy (two start-ups that were once seen to differ in speed), and
must report the same routes and thread counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCENARIO = textwrap.dedent(
    """
    import json, os, sys
    one_cpu = os.environ.get("ONE_CPU") == "1"
    if one_cpu:  # before torch starts its thread pool: every pool thread inherits this mask
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import torch
    torch.set_num_threads(2)
    import pysparse
    from pysparse.kernels import ops
    pinned = pysparse.pin_threads() if os.environ.get("PIN") == "1" else None
    gen = torch.Generator().manual_seed(0)
    w = ops.prune24(torch.randn(1024, 1024, generator=gen))
    v, m = ops.compress24(w)
    x = torch.randn(1, 1024, generator=gen)
    ops.sparse24_linear(x, v, m)
    ops.kernel_stats(reset=True)
    for _ in range(50):
        ops.sparse24_linear(x, v, m)
    print(json.dumps({"stats": ops.kernel_stats(), "pinned": pinned,
                      "route": pysparse.build_info()["cpu"]["linear_impl"]}))
    """
)


def _run(tmp_path, how: str, **env) -> dict:
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    if how == "script":
        cmd = [sys.executable, str(script)]
    else:
        cmd = [
            sys.executable,
            "-c",
            f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')",
        ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env={**os.environ, **env}, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gemv(res: dict) -> dict:
    route = f"gemv_{res['route']}" if res["route"] != "scalar" else "linear_scalar"
    assert list(res["stats"]) == [route], res["stats"]  # decode-size calls take the GEMV only
    return res["stats"][route]


needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to run a two-thread team apart"
)


@needs_two_cpus
@pytest.mark.parametrize("how", ["script", "runpy"])
def test_decode_gemv_uses_every_thread_it_asks_for_however_started(tmp_path, how):
    s = _gemv(_run(tmp_path, how))
    assert s["calls"] == 50
    assert s["threads_requested"] == 100 and s["threads_used"] == 100
    assert s["min_allowed_cpus"] >= 2


@needs_two_cpus
@pytest.mark.parametrize("how", ["script", "runpy"])
def test_pinned_team_never_shares_a_cpu(tmp_path, how):
    res = _run(tmp_path, how, PIN="1")
    cpus = sorted(os.sched_getaffinity(0))
    assert res["pinned"] == cpus[:2]
    s = _gemv(res)
    assert s["threads_used"] == 100
    assert s["one_cpu_calls"] == 0  # pinned to two CPUs: two threads cannot report one
    assert s["min_allowed_cpus"] == 1


def test_a_team_confined_to_one_cpu_is_reported(tmp_path):
    """The observable can fail: a process whose threads all inherit a one-CPU mask (as a pool
    started under a pinned parent would) shows every two-thread region on one CPU."""
    s = _gemv(_run(tmp_path, "script", ONE_CPU="1"))
    assert s["threads_used"] == 100
    assert s["one_cpu_calls"] == 50
    assert s["min_allowed_cpus"] == 1


def test_pin_threads_refuses_more_threads_than_cpus():
    import pysparse

    with pytest.raises(RuntimeError, match="cannot pin"):
        pysparse.pin_threads(len(os.sched_getaffinity(0)) + 1)
