"""Kill ``uwsfmt convert`` and ``uwsfmt append`` with SIGKILL at random points; check nothing is lost.

Every run is the CLI's ``main()`` in a forked child of this process, which has imported and
warmed up uwsfmt already: a run then takes tens of milliseconds instead of seconds of interpreter
start-up, and the kill lands in the command's real work. In the child only, every file write
(zarr's ``LocalStore`` put, which writes a temporary file and renames it) is slowed by a couple of
milliseconds so that kill times spread over the whole write sequence. Two kinds of kill points:

- ``time``: SIGKILL after a delay drawn uniformly from [0, 1.2 x the duration of an
  uninterrupted run] (a run that finishes first is checked as completed, not counted as a kill);
- ``write``: the child SIGKILLs itself just before its k-th file write, k over an even sample of
  the command's writes, and once just after its last write (the commit).

``--exec N`` adds N time kills per command of the real console command (``python -m uwsfmt.cli``
in a fresh interpreter), with delays over its whole run, start-up included.

After every kill:

- append: the store opens at exactly the previous or the new committed state (generation and
  every tensor of every model identical to a reference read), ``validate(deep=True)`` passes, and
  a further append succeeds and validates;
- convert: the target holds no store (fresh target) or exactly the old store (``--overwrite`` onto
  an existing one), or exactly the new store; a temporary folder left behind is rejected by
  ``validate`` (killed before the build's commit) or is exactly the new store (killed between the
  commit and the rename); running the same convert again succeeds and removes the leftovers.

    python -m tests.crash_harness --kills 24 --seed 0 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import uwsfmt
from uwsfmt import cli
from uwsfmt.testing.families import synthetic_family, write_family

SHAPES = {"blocks.0.attn.qkv.weight": (48, 16), "blocks.0.mlp.fc1.weight": (32, 16), "conv.weight": (8, 4, 3, 3)}
#: every kind of write: subspace (an error budget picks ranks), dense pack slots, shared, per-model
#: arrays (a head whose shape varies), bf16 tensors, and (append) a budget exception
CONVERT_ARGS = ["--max-error", "0.01", "--min-numel", "64", "-q"]
OLD_ARGS = ["--rank", "1", "--min-numel", "64", "-q"]
SLOW_WRITE_S = 0.002


# ---------------------------------------------------------------------------- the family


def make_sources(folder: Path) -> list[str]:
    """Seven small models; #5 and #6 (appended) are off the family's subspace, so appending them
    needs per-model exceptions."""
    fam = synthetic_family(n_models=7, shapes=SHAPES, rank=2, noise=1e-3, seed=3)
    g = torch.Generator().manual_seed(7)
    for i, sd in enumerate(fam.values()):
        sd["head.weight"] = torch.randn(2 + i % 2, 16, generator=g)  # shape varies: per-model arrays
        sd["blocks.0.mlp.fc2.weight"] = (sd["blocks.0.mlp.fc1.weight"].T * 0.5).to(torch.bfloat16)
        if i >= 5:
            sd["blocks.0.mlp.fc1.weight"] = sd["blocks.0.mlp.fc1.weight"] + 0.3 * torch.randn(32, 16, generator=g)
    return [str(p) for p in write_family(fam, folder)]


# ---------------------------------------------------------------------------- running the CLI


def _child(argv: list[str], kill_at_write: int | None, slow: float, log: str, count_file: str | None) -> None:
    """In the forked child: run the CLI, SIGKILLing ourselves just before write #kill_at_write
    (negative: just after write #-kill_at_write)."""
    rc = 99
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        import zarr.storage._local as local

        put, count = local._put, [0]

        def counted_put(path, value, exclusive=False):
            count[0] += 1
            if count[0] == kill_at_write:
                os.kill(os.getpid(), signal.SIGKILL)
            if slow:
                time.sleep(slow)
            done = put(path, value, exclusive=exclusive)
            if kill_at_write is not None and count[0] == -kill_at_write:
                os.kill(os.getpid(), signal.SIGKILL)
            return done

        local._put = counted_put
        rc = cli.main(argv)
        if count_file:
            Path(count_file).write_text(str(count[0]))
    except BaseException:  # noqa: BLE001 - report, never return into the parent's code
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def run_forked(argv, *, delay: float | None = None, kill_at_write: int | None = None, slow: float = SLOW_WRITE_S,
               log: str = os.devnull, count_file: str | None = None) -> dict:
    """Run ``uwsfmt argv`` in a forked child; SIGKILL it after ``delay`` s if it is still running."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(argv, kill_at_write, slow, log, count_file)
    return _reap(pid, t0, delay)


def run_exec(argv, *, delay: float | None = None, log: str = os.devnull) -> dict:
    """The real console command in a fresh interpreter."""
    t0 = time.monotonic()
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "uwsfmt.cli", *argv], stdout=out, stderr=subprocess.STDOUT)
    return _reap(p.pid, t0, delay, popen=p)


def _reap(pid: int, t0: float, delay: float | None, popen=None) -> dict:
    killed_at = None
    status = None
    if delay is not None:
        deadline = t0 + delay
        while time.monotonic() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            time.sleep(0.0005)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic() - t0
    if status is None:
        _, status = os.waitpid(pid, 0)
    if popen is not None:
        popen.returncode = 0  # reaped here; keep Popen from waiting again
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"killed": killed, "killed_at": killed_at, "rc": None if killed else os.waitstatus_to_exitcode(status),
            "elapsed": time.monotonic() - t0}


# ---------------------------------------------------------------------------- states


def snapshot(path: str) -> tuple[int, dict]:
    """(generation, {model id: {tensor: bytes}}) of a store: what a reader gets."""
    with uwsfmt.open(path) as st:
        models = {}
        for mid in st.model_ids:
            models[mid] = {k: (str(v.dtype), tuple(v.shape), v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                           for k, v in st.state_dict(mid).items()}
        return st.manifest["generation"], models


def leftovers(target: str, mark: str | None = None) -> list[str]:
    """A killed convert's temporary folders (``mark``: only those with that mark; default: the
    build's and the replaced store's)."""
    parent, name = os.path.split(os.path.abspath(target))
    marks = (mark,) if mark else (uwsfmt.reader.manifest.BUILDING_MARK, uwsfmt.reader.manifest.REPLACED_MARK)
    return sorted(os.path.join(parent, e) for e in os.listdir(parent) if e.startswith(tuple(f".{name}{m}" for m in marks)))


def _snapshot_or_none(path: str) -> tuple[int, dict] | None:
    """:func:`snapshot`, or None where a (partly deleted) store cannot be read back."""
    try:
        return snapshot(path)
    except uwsfmt.UWSError:
        return None


def rejected(path: str) -> bool:
    """True when validate refuses a leftover temporary folder (it must never pass as a store)."""
    try:
        return bool(uwsfmt.validate(path))
    except uwsfmt.UWSError:
        return True


# ---------------------------------------------------------------------------- the experiments


class Harness:
    def __init__(self, work: Path, seed: int, log=print):
        self.work = work
        self.rng = random.Random(seed)
        self.log = log
        self.srcs = make_sources(work / "src")
        self.results: dict[str, list[dict]] = {"convert": [], "append": []}
        self.failures: list[str] = []
        self._n = 0

    def _fresh(self, stem: str) -> Path:
        self._n += 1
        d = self.work / f"{stem}-{self._n:03d}"
        d.mkdir()
        return d

    # ---------------------------------------------------------------- references
    def prepare(self) -> None:
        ref = self._fresh("ref")
        self.new_argv = lambda out, ow=False: ["convert", *self.srcs[:5], "-o", str(out), *CONVERT_ARGS, *(["--overwrite"] if ow else [])]
        self.old_argv = lambda out: ["convert", *self.srcs[1:5], "-o", str(out), *OLD_ARGS]
        self._check_run(run_forked(self.new_argv(ref / "new.uws"), slow=0), "reference convert")
        self._check_run(run_forked(self.old_argv(ref / "old.uws"), slow=0), "reference old convert")
        self.store = str(ref / "new.uws")
        self.old_store = str(ref / "old.uws")
        self.state_new = snapshot(self.store)
        self.state_old = snapshot(self.old_store)
        after = ref / "after.uws"
        shutil.copytree(self.store, after)
        self.append_argv = lambda store: ["append", str(store), self.srcs[5], "--id", "late"]
        self._check_run(run_forked(self.append_argv(after), slow=0), "reference append")
        self.state_appended = snapshot(str(after))
        assert len(self.state_appended[1]) == len(self.state_new[1]) + 1
        with uwsfmt.open(after) as st:
            self.append_exceptions = len(st.manifest["models"][-1].get("exceptions") or [])
        # durations of uninterrupted runs and their write counts
        self.t, self.writes = {}, {}
        for cmd in ("convert", "append"):
            times = []
            for _ in range(3):
                d = self._fresh(f"clock-{cmd}")
                cnt = str(d / "count")
                if cmd == "convert":
                    r = run_forked(self.new_argv(d / "s.uws"), count_file=cnt)
                else:
                    shutil.copytree(self.store, d / "s.uws")
                    r = run_forked(self.append_argv(d / "s.uws"), count_file=cnt)
                self._check_run(r, f"timing run of {cmd}")
                times.append(r["elapsed"])
                self.writes[cmd] = int(Path(cnt).read_text())
                shutil.rmtree(d)
            self.t[cmd] = sorted(times)[1]
        self.log(f"uninterrupted runs (forked, slowed writes): convert {self.t['convert']:.3f} s / {self.writes['convert']} writes, "
                 f"append {self.t['append']:.3f} s / {self.writes['append']} writes ({self.append_exceptions} exceptions)")

    def _check_run(self, r: dict, what: str) -> None:
        if r["killed"] or r["rc"] != 0:
            raise RuntimeError(f"{what} failed: {r}")

    # ---------------------------------------------------------------- append
    def append_once(self, kind: str, *, delay=None, at=None, exec_=False) -> dict:
        d = self._fresh("append")
        store = d / "s.uws"
        shutil.copytree(self.store, store)
        log = str(d / "log")
        if exec_:
            r = run_exec(self.append_argv(store), delay=delay, log=log)
        else:
            r = run_forked(self.append_argv(store), delay=delay, kill_at_write=at, log=log)
        rec = {"kind": kind, "delay": delay, "write": at, **r}
        problems = []
        if not r["killed"] and r["rc"] != 0:
            problems.append(f"exited {r['rc']} without being killed: {Path(log).read_text()[-500:]}")
        try:
            state = snapshot(str(store))
            rec["state"] = "new" if state == self.state_appended else "previous" if state == self.state_new else "OTHER"
            if rec["state"] == "OTHER":
                problems.append("the store is at neither the previous nor the new committed state")
            bad = uwsfmt.validate(str(store), deep=True)
            if bad:
                problems.append(f"validate: {bad[:3]}")
            uwsfmt.append(str(store), self.srcs[6], id="after-crash")  # the store takes the next append
            with uwsfmt.open(store) as st:
                if st.n_models != len(state[1]) + 1 or st.model_ids[-1] != "after-crash":
                    problems.append(f"the next append gave {st.n_models} models")
            bad = uwsfmt.validate(str(store), deep=True)
            if bad:
                problems.append(f"validate after the next append: {bad[:3]}")
        except uwsfmt.UWSError as e:
            problems.append(f"{type(e).__name__}: {e}")
        return self._record("append", rec, problems, f"append {kind} delay={delay} write={at}", d)

    def _record(self, campaign: str, rec: dict, problems: list[str], label: str, workdir) -> dict:
        """File one crash's outcome; keep its folder for inspection only when something is wrong."""
        rec["ok"] = not problems
        rec["problems"] = problems
        self.results[campaign].append(rec)
        if problems:
            self.failures.append(f"{label}: {problems}")
        else:
            shutil.rmtree(workdir)
        return rec

    # ---------------------------------------------------------------- convert
    def convert_once(self, kind: str, *, overwrite: bool, delay=None, at=None, exec_=False) -> dict:
        d = self._fresh("convert")
        target = d / "s.uws"
        if overwrite:
            shutil.copytree(self.old_store, target)
        log = str(d / "log")
        argv = self.new_argv(target, overwrite)
        if exec_:
            r = run_exec(argv, delay=delay, log=log)
        else:
            r = run_forked(argv, delay=delay, kill_at_write=at, log=log)
        rec = {"kind": kind, "overwrite": overwrite, "delay": delay, "write": at, **r}
        problems = []
        if not r["killed"] and r["rc"] != 0:
            problems.append(f"exited {r['rc']} without being killed: {Path(log).read_text()[-500:]}")
        try:
            if target.exists():
                state = snapshot(str(target))
                rec["state"] = "new" if state == self.state_new else "old" if (overwrite and state == self.state_old) else "OTHER"
                if rec["state"] == "OTHER":
                    problems.append("the target holds a store that is neither the old nor the new one")
                elif uwsfmt.validate(str(target), deep=True):
                    problems.append("validate fails on the target")
            else:
                rec["state"] = "absent"
                if overwrite:
                    problems.append("the old store vanished from the target")
            left = leftovers(str(target))
            rec["leftovers"] = len(left)
            for p in leftovers(str(target), uwsfmt.reader.manifest.BUILDING_MARK):
                # killed before its commit: validate refuses it; after (not yet renamed): the new store
                if not rejected(p) and snapshot(p) != self.state_new:
                    problems.append(f"validate accepts a leftover temporary folder that is not the new store: {p}")
            for p in leftovers(str(target), uwsfmt.reader.manifest.REPLACED_MARK):
                # killed while deleting the store it replaced: the target holds the new one already
                if rec["state"] != "new":
                    problems.append(f"a replaced store is being deleted but the target is not the new store: {p}")
                elif not rejected(p) and _snapshot_or_none(p) not in (None, self.state_old):
                    problems.append(f"a leftover replaced store that validate accepts is not the old store: {p}")
            if rec["state"] != "new" or left:  # run it again: it must succeed and clean up
                again = run_forked(self.new_argv(target, overwrite or rec["state"] == "new"), slow=0, log=log)
                if again["rc"] != 0:
                    problems.append(f"re-running the convert failed: {Path(log).read_text()[-500:]}")
                elif snapshot(str(target)) != self.state_new:
                    problems.append("the re-run did not give the new store")
            if leftovers(str(target)):
                problems.append(f"leftovers after the re-run: {leftovers(str(target))}")
            lock = target.parent / f".{target.name}.uws-convert.lock"
            if lock.exists() and rec["state"] == "new" and not r["killed"]:
                problems.append("a completed convert left its lock file")
        except uwsfmt.UWSError as e:
            problems.append(f"{type(e).__name__}: {e}")
        return self._record("convert", rec, problems, f"convert {kind} overwrite={overwrite} delay={delay} write={at}", d)

    # ---------------------------------------------------------------- campaigns
    def time_kills(self, cmd: str, kills: int) -> None:
        got = tries = 0
        while got < kills and tries < 4 * kills:
            tries += 1
            delay = self.rng.uniform(0, 1.2 * self.t[cmd])
            if cmd == "append":
                rec = self.append_once("time", delay=delay)
            else:
                rec = self.convert_once("time", overwrite=bool(tries % 2), delay=delay)
            got += rec["killed"]

    def write_kills(self, cmd: str, limit: int) -> None:
        if limit <= 0:
            return
        n, before = self.writes[cmd], limit - 1  # points before a write, evenly spread, + one after the last
        points = list(range(1, n + 1)) if n <= before else sorted({1 + round(i * (n - 1) / max(1, before - 1)) for i in range(before)})
        points.append(-n)  # just after the last write (the commit)
        for i, k in enumerate(points):
            if cmd == "append":
                self.append_once("write", at=k)
            else:
                self.convert_once("write", overwrite=bool(i % 2), at=k)

    def exec_kills(self, cmd: str, n: int) -> None:
        if n <= 0:
            return
        d = self._fresh("exec-clock")
        if cmd == "convert":
            r = run_exec(self.new_argv(d / "s.uws"))
        else:
            shutil.copytree(self.store, d / "s.uws")
            r = run_exec(self.append_argv(d / "s.uws"))
        self._check_run(r, f"uninterrupted `uwsfmt {cmd}`")
        shutil.rmtree(d)
        for i in range(n):
            delay = self.rng.uniform(0, 1.1 * r["elapsed"])
            if cmd == "append":
                self.append_once("exec", delay=delay, exec_=True)
            else:
                self.convert_once("exec", overwrite=bool(i % 2), delay=delay, exec_=True)

    def summary(self) -> dict:
        out = {}
        for cmd, recs in self.results.items():
            by = {}
            for kind in ("time", "write", "exec"):
                rs = [r for r in recs if r["kind"] == kind]
                states: dict[str, int] = {}
                for r in rs:
                    if r["killed"]:
                        states[r.get("state", "?")] = states.get(r.get("state", "?"), 0) + 1
                by[kind] = {"runs": len(rs), "killed": sum(r["killed"] for r in rs),
                            "killed_ok": sum(r["killed"] and r["ok"] for r in rs),
                            "completed_before_kill": sum(not r["killed"] for r in rs), "states_after_kill": states}
            out[cmd] = {**by, "kill_points": sum(v["killed"] for v in by.values()),
                        "intact": sum(v["killed_ok"] for v in by.values()),
                        "uninterrupted_s": self.t[cmd], "writes": self.writes[cmd]}
        out["append_exceptions"] = self.append_exceptions
        out["failures"] = self.failures
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=24, help="time kills per command (runs that finish first are not counted)")
    p.add_argument("--write-kills", type=int, default=12, help="at most this many write-boundary kills per command")
    p.add_argument("--exec", type=int, default=0, dest="exec_", help="time kills per command of the real console command")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # before any work: forked children must not inherit a thread pool
    work = Path(tempfile.mkdtemp(prefix="uws-crash-"))
    t0 = time.monotonic()
    try:
        h = Harness(work, a.seed)
        h.prepare()
        for cmd in ("append", "convert"):
            h.time_kills(cmd, a.kills)
            h.write_kills(cmd, a.write_kills)
            h.exec_kills(cmd, a.exec_)
        s = h.summary()
        s["seconds"] = round(time.monotonic() - t0, 1)
        s["seed"] = a.seed
        for cmd in ("convert", "append"):
            c = s[cmd]
            print(f"{cmd}: {c['kill_points']} SIGKILLs mid-run (time {c['time']['killed']}, write-boundary {c['write']['killed']}, "
                  f"exec {c['exec']['killed']}), stores intact after {c['intact']}; "
                  f"{c['time']['completed_before_kill'] + c['exec']['completed_before_kill']} runs finished before their kill; "
                  f"states after a kill: time {c['time']['states_after_kill']}, write {c['write']['states_after_kill']}")
        print(f"{len(s['failures'])} failures in {s['seconds']} s")
        for f in s["failures"]:
            print("FAIL", f)
        if a.json:
            Path(a.json).write_text(json.dumps(s, indent=1, default=str))
        return 1 if s["failures"] else 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder: {work}")


if __name__ == "__main__":
    sys.exit(main())
