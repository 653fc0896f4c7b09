"""Reading a store over the network: requests and bytes per model and per tensor, from a loopback
S3 server (moto, in its own process) and a ranged HTTP server, against the same store on disk.

    python bench/remote.py            # 500 tensors of 64x64, 12 models
    python bench/remote.py --quick    # 100 tensors

Counts are exact (the HTTP server counts what it sends; S3 requests are counted by a zarr
store wrapper); times on loopback measure client-side cost, not a network's latency, so the
last table turns the counts into time at a given round trip and bandwidth.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import zarr.storage
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

import uwsfmt
from uwsfmt.testing.servers import RangeHTTPServer, S3Server


class Counting(zarr.storage.WrapperStore):
    """A zarr store that counts the reads (requests) and bytes it passes on."""

    requests = 0
    nbytes = 0

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        got = await self._store.get(key, prototype, byte_range)
        type(self).requests += 1
        type(self).nbytes += len(got) if got is not None else 0
        return got

    async def getsize(self, key: str) -> int:
        type(self).requests += 1
        return await self._store.getsize(key)

    @classmethod
    def reset(cls) -> None:
        cls.requests = cls.nbytes = 0


def family(n_models: int, n_tensors: int, rank: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    basis = [torch.randn(64, rank, generator=g) for _ in range(n_tensors)]
    return {f"m{i:03d}": {f"layer{j:03d}.weight": basis[j] @ torch.randn(rank, 64, generator=g) + 1e-3 * torch.randn(64, 64, generator=g)
                          for j in range(n_tensors)} for i in range(n_models)}


def measure(open_store, counter) -> dict:
    out = {}
    st = open_store()
    counter.reset()
    t = time.perf_counter()
    st.state_dict(1)
    out["first model"] = (counter.requests, counter.nbytes, time.perf_counter() - t)
    counter.reset()
    t = time.perf_counter()
    st.state_dict(2)
    out["next model"] = (counter.requests, counter.nbytes, time.perf_counter() - t)
    st2 = open_store()
    st2.tensor(0, st2.tensor_names[0])  # pack metadata read once
    counter.reset()
    t = time.perf_counter()
    st2.tensor(3, st2.tensor_names[len(st2.tensor_names) // 2])
    out["one tensor"] = (counter.requests, counter.nbytes, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="round trip for the network estimate")
    ap.add_argument("--mbps", type=float, default=1000.0, help="bandwidth (Mbit/s) for the network estimate")
    a = ap.parse_args()
    n_tensors = 100 if a.quick else 500
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "fam.uws")
        fam = family(12, n_tensors)
        st = uwsfmt.convert(fam, local, rank=8, min_numel=1, progress=False)
        print(f"family: 12 models x {n_tensors} tensors of 64x64 float32, rank 8; store {st.summary()['store_bytes'] / 2**20:.1f} MiB, "
              f"pack row {4 * st.manifest['packs']['float32']['width'] / 2**10:.0f} KiB")
        rows = {}
        Counting.reset()
        rows["disk, through zarr (counted)"] = measure(lambda: uwsfmt.open(Counting(zarr.storage.LocalStore(local, read_only=True))), Counting)
        with RangeHTTPServer(tmp) as http:
            res = {}
            st = uwsfmt.open(http.url("fam.uws"))
            for what, call in (("first model", lambda s: s.state_dict(1)), ("next model", lambda s: s.state_dict(2))):
                http.reset()
                t = time.perf_counter()
                call(st)
                res[what] = (len(http.requests), http.bytes_sent, time.perf_counter() - t)
            st2 = uwsfmt.open(http.url("fam.uws"))
            st2.tensor(0, st2.tensor_names[0])
            http.reset()
            t = time.perf_counter()
            st2.tensor(3, st2.tensor_names[len(st2.tensor_names) // 2])
            res["one tensor"] = (len(http.requests), http.bytes_sent, time.perf_counter() - t)
            rows["HTTP (server-side count)"] = res
        with S3Server() as s3:
            s3.bucket("bench")
            url = "s3://bench/fam.uws"
            t = time.perf_counter()
            uwsfmt.convert(fam, url, rank=8, min_numel=1, progress=False, storage_options=s3.options())
            upload = time.perf_counter() - t
            so = s3.options()
            rows["S3 (moto)"] = measure(lambda: uwsfmt.open(Counting(zarr.storage.FsspecStore.from_url(url, storage_options=so, read_only=True))),
                                        Counting)
            t = time.perf_counter()
            uwsfmt.open(url, mode="a", storage_options=so).extend({"extra": fam["m000"]}, progress=False)
            append = time.perf_counter() - t
        print("\n| store | read | requests | bytes | time on loopback |\n|---|---|---:|---:|---:|")
        for where, res in rows.items():
            for what, (n, b, t) in res.items():
                print(f"| {where} | {what} | {n} | {b / 1024:,.1f} KiB | {1000 * t:.0f} ms |")
        print(f"\nconvert to S3 (local build + upload): {upload:.1f} s; append one model on S3: {append:.2f} s")
        print(f"\nestimate at {a.rtt_ms:g} ms round trip, {a.mbps:g} Mbit/s, 32 requests in flight (uwsfmt's prefetch):")
        for what, (n, b, _) in rows["S3 (moto)"].items():
            waves = -(-n // 32) if what == "first model" else n
            print(f"  {what}: {waves * a.rtt_ms / 1000 + b * 8 / (a.mbps * 1e6):.2f} s")
        one_row = 4 * uwsfmt.open(local).manifest["packs"]["float32"]["width"]
        n, b, _ = rows["S3 (moto)"]["one tensor"]
        print(f"\none tensor reads {b / 1024:.1f} KiB ({n} requests); its pack row alone is {one_row / 1024:.0f} KiB "
              f"({one_row / b:.1f}x more)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
