"""Peak RSS of one build, in a fresh process: ``python bench/memory_probe.py OUT SETTINGS_JSON SOURCES...``.

Prints one JSON line: peak RSS (bytes: ``VmHWM`` of /proc/self/status, which includes mapped file
pages the process touched), RSS after imports, and the build's wall time. Not ``ru_maxrss``: on
Linux a child's ru_maxrss starts at its parent's RSS at fork time, which would hide the build.
"""

from __future__ import annotations

import json
import sys
import time


def status(field: str) -> int:
    """A /proc/self/status size field (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    out, settings, *paths = sys.argv[1:]
    import torch

    import uwsfmt

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    before = status("VmRSS")
    t = time.perf_counter()
    uwsfmt.convert(paths, out, overwrite=True, **json.loads(settings))
    secs = time.perf_counter() - t
    peak = status("VmHWM")
    print(json.dumps({"n_models": len(paths), "peak_rss": peak, "rss_after_imports": before, "seconds": secs}))


if __name__ == "__main__":
    main()
