"""train/host_allocator.py: a worker keeps its large per-step buffers instead of faulting them in
again every step, and leaves an allocator the user chose alone."""

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from carousel.train.host_allocator import user_choice

ROOT = Path(__file__).resolve().parents[2]

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# A step's shape: several 16 MB buffers alive at once, each written, then all freed (the LM's
# logits, log-probabilities and their gradients in the benchmark job are 16 MB each).
# Ray Train runs the train function in a thread of its own (other threads exist before it), so
# the steps run in a new thread and count that thread's faults.
STEPS = """
    import resource, threading
    def step():
        bufs = [bytearray(16 << 20) for _ in range(4)]
        for b in bufs:
            b[::4096] = b"\\x01" * len(range(0, len(b), 4096))  # touch every page
    def train():
        step()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(5):
            step()
        print(setting, (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 5)
    t = threading.Thread(target=train)
    t.start()
    t.join()
"""
PAGES_PER_STEP = 4 * (16 << 20) // 4096


def faults_per_step(prelude: str, env: dict[str, str] | None = None) -> tuple[str, float]:
    code = textwrap.dedent(prelude) + textwrap.dedent(STEPS)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**clean, **(env or {})}, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    setting, faults = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    return setting, float(faults)


@glibc
def test_a_worker_reuses_its_large_buffers_instead_of_faulting_them_in_every_step():
    _, untuned = faults_per_step("setting = 'default'")
    setting, tuned = faults_per_step("""
        from carousel.train.process_group import apply_env  # what every Ray Train worker runs first
        from carousel.train import host_allocator
        apply_env({})
        setting = host_allocator.applied().replace(" ", "_")
    """)
    assert setting.startswith("glibc,_large_buffers_kept"), setting
    assert tuned < 0.02 * PAGES_PER_STEP, (tuned, untuned)
    # The control: glibc's own thresholds give the memory back after each step here.
    assert untuned > 0.5 * PAGES_PER_STEP, untuned


@glibc
def test_the_users_own_malloc_settings_are_kept():
    setting, faults = faults_per_step("""
        import os
        from carousel.train import host_allocator
        setting = host_allocator.apply(os.environ).replace(" ", "_")
    """, {"MALLOC_ARENA_MAX": "2"})
    assert setting == "left_as_set_(MALLOC_ARENA_MAX=2)"
    assert faults > 0.5 * PAGES_PER_STEP


def test_an_allocator_chosen_by_the_user_wins():
    assert user_choice({}) is None
    assert user_choice({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}).startswith("LD_PRELOAD=")
    assert user_choice({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is not None
    assert user_choice({"LD_PRELOAD": "/opt/profiler/libtrace.so"}) is None  # not an allocator
    assert user_choice({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_=0"
    assert user_choice({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}) == "GLIBC_TUNABLES"
    assert user_choice({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is None
