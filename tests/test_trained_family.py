"""A really-trained family (digits MLPs fine-tuned from one base): accuracy survives the store."""

from __future__ import annotations

import numpy as np

import uwsfmt
from bench.trained import trained_family


def test_default_settings_keep_accuracy(tmp_path, capsys):
    tf = trained_family(n_tasks=6)
    orig = tf.accuracies()
    store = uwsfmt.convert(tf.state_dicts, tmp_path / "s.uws")  # defaults: fidelity first
    rec = {mid: tf.evaluate(mid, store.state_dict(mid)) for mid in tf.state_dicts}
    drops = {m: orig[m] - rec[m] for m in orig}
    s = store.summary()
    with capsys.disabled():
        print(f"\n[trained family] {len(orig)} tasks, mean acc {np.mean(list(orig.values())):.2f} -> "
              f"{np.mean(list(rec.values())):.2f}, worst drop {max(drops.values()):.2f} pt, "
              f"compression {s['ratio']:.2f}x, max weight error {s['error_max']:.2e}")
    assert max(drops.values()) <= 0.5, drops
    # info reports what was achieved, honestly: recorded errors match a recomputation
    errs = store.errors()
    for i, mid in enumerate(store.model_ids):
        sd = store.state_dict(mid)
        for j, name in enumerate(store.tensor_names):
            w = tf.state_dicts[mid][name].double()
            got = float((sd[name].double() - w).norm() / w.norm()) if w.norm() > 0 else 0.0
            assert abs(got - errs[i, j]) <= 1e-4 * max(1.0, got) + 1e-7
