"""uwsfmt.overlap: read-ahead, write-behind and background work keep order, surface errors, and
a build with them on writes the same store as one without."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import uwsfmt
from uwsfmt import overlap
from uwsfmt.families import synthetic_family


def test_read_ahead_keeps_order_and_reads_one_ahead():
    started: list[int] = []

    def thunk(i):
        started.append(i)
        return i * 10

    got = []
    for x in overlap.read_ahead([lambda i=i: thunk(i) for i in range(5)]):
        time.sleep(0.01)  # let the reader run ahead
        got.append(x)
        assert len(started) <= len(got) + 1  # never more than one item in flight
    assert got == [0, 10, 20, 30, 40]
    assert list(overlap.read_ahead([lambda: 1, lambda: 2], enabled=False)) == [1, 2]
    assert list(overlap.read_ahead([])) == []


def test_read_ahead_raises_where_the_item_is_consumed():
    def bad():
        raise OSError("disk gone")

    it = overlap.read_ahead([lambda: 1, bad, lambda: 3])
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def test_write_behind_runs_everything_and_reraises_failures():
    out: list[int] = []
    with overlap.WriteBehind(depth=2) as wb:
        for i in range(20):
            wb.submit(out.append, i)
    assert out == list(range(20))  # one thread: in order, all done on exit

    def fail():
        raise OSError("No space left on device")

    wb = overlap.WriteBehind()
    wb.submit(fail)
    with pytest.raises(OSError, match="No space"):
        wb.drain()
    wb.close()
    inline = overlap.WriteBehind(enabled=False)
    inline.submit(out.append, 99)
    assert out[-1] == 99  # ran at once
    inline.close()


def test_write_behind_does_not_mask_the_callers_exception():
    wb = overlap.WriteBehind()
    with pytest.raises(KeyError):
        with wb:
            wb.submit(lambda: (_ for _ in ()).throw(OSError("late")))
            raise KeyError("first")


def test_background_result_and_error():
    assert overlap.Background(lambda: 42).result() == 42
    b = overlap.Background(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        b.result()
    # it runs at low priority where the platform allows it (Linux: per-thread nice)
    seen = {}

    def probe():
        import os
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    overlap.Background(probe).result()
    if hasattr(threading, "get_native_id"):
        assert seen["nice"] >= 0


@pytest.mark.parametrize("basis", ["exact", "sketch"])
def test_build_with_overlap_equals_build_without(tmp_path, monkeypatch, basis):
    fam = synthetic_family(n_models=5, shapes={"a": (256, 96), "b": (64, 300)}, rank=3, noise=1e-3, extra=True, seed=4)
    src = tmp_path / "src"
    src.mkdir()
    from safetensors.torch import save_file

    paths = []
    for mid, sd in fam.items():
        p = src / f"{mid}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        paths.append(str(p))
    monkeypatch.setattr(overlap, "useful", lambda device: False)
    serial = uwsfmt.convert(paths, tmp_path / "serial.uws", rank=4, basis=basis)
    monkeypatch.setattr(overlap, "useful", lambda device: True)
    over = uwsfmt.convert(paths, tmp_path / "overlap.uws", rank=4, basis=basis)
    assert [m["source"] for m in serial.manifest["models"]] == [m["source"] for m in over.manifest["models"]]
    assert all(m["source"]["sha256"] for m in over.manifest["models"])
    np.testing.assert_array_equal(serial.errors(), over.errors())
    for mid in serial.model_ids:
        a, b = serial.state_dict(mid), over.state_dict(mid)
        for k in a:
            assert torch.equal(a[k], b[k]), (mid, k)
    assert over.validate(deep=True) == []
