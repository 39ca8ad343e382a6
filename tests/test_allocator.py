"""The glibc malloc policy: memory measurement stays exact under the speed policy and does not leak into timings."""

from __future__ import annotations

import os

import pytest
import torch

from vitkit.bench import allocator
from vitkit.bench.speed import peak_memory_mb
from vitkit.cli import main as cli

glibc = pytest.mark.skipif(allocator.policy() == "unavailable", reason="not a glibc system (malloc policy is a no-op)")


def _chunks(n: int, mib: int = 8) -> list[torch.Tensor]:
    return [torch.ones(mib * 2**18) for _ in range(n)]  # float32: 2^18 elements per MiB


@glibc
@pytest.mark.skipif(peak_memory_mb(lambda: None) is None, reason="no /proc/self/clear_refs on this system")
def test_peak_memory_is_exact_under_the_speed_policy_and_restores_it():
    allocator.tune_allocator()
    assert allocator.policy() == "speed"
    del _chunks(40)[:]  # 320 MiB of 8 MiB blocks, freed: the speed policy keeps them in the heap

    def alloc():
        held = _chunks(12)  # 96 MiB live at once, in blocks the speed policy would serve from the freed heap
        return sum(float(t[0]) for t in held)

    mb = peak_memory_mb(alloc)
    assert 90 < mb < 150, mb  # measured from live memory, not hidden by the memory the heap already held
    assert allocator.policy() == "speed"  # measurement does not leave the slow 'exact' policy behind


@glibc
def test_exact_accounting_restores_the_previous_policy_even_on_error():
    allocator.tune_allocator()
    with pytest.raises(KeyError), allocator.exact_accounting():
        assert allocator.policy() == "exact"
        raise KeyError("boom")
    assert allocator.policy() == "speed"


def test_cli_rejects_an_unknown_malloc_policy(monkeypatch, capsys):
    monkeypatch.setenv("VITKIT_MALLOC", "fastest")
    assert cli(["models", "vit_tiny*"]) == 2
    assert "VITKIT_MALLOC must be 'speed' or 'default'" in capsys.readouterr().err


@glibc
@pytest.mark.parametrize("policy", ["default", pytest.param("speed", marks=pytest.mark.slow)])  # ~8 s each
def test_bench_takes_the_malloc_policy_as_a_runtime_option(policy):
    """A fresh process (glibc cannot return to its default once changed): the row records the policy asked for."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "vitkit", "bench", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "1",
           "--repeats", "1", "--layout", "nchw", "--format", "json", "--malloc", policy]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "VITKIT_MALLOC": "bad"})
    assert done.returncode == 0, done.stderr[-2000:]  # --malloc wins over the environment
    assert json.loads(done.stdout)[0]["allocator"] == policy


def test_bench_rejects_an_unknown_malloc_option():
    with pytest.raises(SystemExit):
        cli(["bench", "vit_tiny_patch16_224", "--malloc", "fastest"])
