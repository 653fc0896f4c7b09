"""Peak memory of a build does not grow with the number of models (4 vs 32 models)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import resource, sys, torch, tempfile, os
    torch.set_num_threads(1)
    import uwsfmt
    from uwsfmt.testing.families import synthetic_family, write_family
    n = int(sys.argv[1]); src = sys.argv[2]; out = sys.argv[3]
    paths = sorted(os.path.join(src, f) for f in os.listdir(src))[:n]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    uwsfmt.convert(paths, out, rank=8, residual_bits=8)
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


@pytest.mark.slow
def test_build_memory_flat_in_model_count(tmp_path):
    from uwsfmt.testing.families import synthetic_family, write_family

    shapes = {f"layer{i}.weight": (512, 512) for i in range(6)}  # 6 MiB per model
    fam = synthetic_family(n_models=32, shapes=shapes, rank=4, noise=1e-3, extra=False, seed=0)
    write_family(fam, tmp_path / "src")
    del fam
    peaks = {}
    for n in (4, 32):
        p = subprocess.run([sys.executable, "-c", PROBE, str(n), str(tmp_path / "src"), str(tmp_path / f"s{n}.uws")],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        before, after = (int(x) for x in p.stdout.split())
        peaks[n] = after
    model_kib = 6 * 1024
    growth = peaks[32] - peaks[4]
    print(f"\n[memory] peak RSS 4 models {peaks[4] / 1024:.0f} MiB, 32 models {peaks[32] / 1024:.0f} MiB")
    # 28 extra models would add 168 MiB if held; allow noise of ~2 models
    assert growth < 2 * model_kib, peaks
