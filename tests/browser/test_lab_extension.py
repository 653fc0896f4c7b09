"""The JupyterLab extension end to end: file browser -> convert -> inspector -> export, in chromium.

Starts JupyterLab (the harness in conftest.py, with this checkout's server extension and prebuilt
labextension) on a temporary root holding a folder of checkpoints, and drives it as a user would:
right-click the folder, "Convert to UWS store…", Run, see the store appear, double-click it, compare
the inspector's numbers with ``uwsfmt info --json``, export a model, validate, add checkpoints; then cancel a running job and reload the page while another runs.
Screenshots of each panel go to tests/browser/artifacts/; the inspector's also to docs/img/.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jupyter_family import family, write

from .conftest import ARTIFACTS, REPO_ROOT

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DOC_SHOT = REPO_ROOT / "docs" / "img" / "jupyterlab-inspector.png"
ITEM = ".jp-DirListing-item"


def fmt_err(x: float | None) -> str:
    """format.js's fmtErr, to compare what the inspector shows with the library's number."""
    if x is None or not math.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e4:
        m, e = f"{x:.2e}".split("e")
        return f"{m}e{'-' if int(e) < 0 else '+'}{abs(int(e))}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else str(x)


def info_json(root: Path, store: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "info", "--json", store], cwd=root, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return json.loads(out.stdout)


def open_lab(lab, path: str = ""):
    context = lab.browser.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    lab.pages.append(page)
    page.on("pageerror", lambda exc: lab.js_errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and lab.js_errors.append(msg.text))
    page.set_default_timeout(60_000)
    page.goto(f"{lab.server.url}/lab{'/tree/' + path if path else ''}?reset")
    page.locator(f"{ITEM}").first.wait_for(timeout=90_000)
    return page


def row(page, name: str, file_type: str | None = None):
    """The file browser's row of ``name`` (optionally of that file type)."""
    sel = f"{ITEM}[data-file-type='{file_type}']" if file_type else ITEM
    return page.locator(sel).filter(has=page.locator(".jp-DirListing-itemText", has_text=re.compile(f"^{re.escape(name)}$"))).first


def context_menu(page, name: str, label: str) -> None:
    row(page, name).click(button="right")
    page.locator(".lm-Menu-item", has_text=label).first.click()


def shot(page, name: str, selector: str | None = None) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"lab-{name}.png"
    if selector:
        page.locator(selector).first.screenshot(path=str(path))
    else:
        page.screenshot(path=str(path))
    return path


CURRENT = ".lm-DockPanel-widget:not(.lm-mod-hidden)"


def test_convert_open_inspect_export_from_the_file_browser(lab):
    root = lab.root
    write(root / "ckpts", family(4))
    page = open_lab(lab)
    earlier_sessions = {x["id"] for x in json.loads(page.evaluate("fetch('/api/sessions').then(r => r.text())"))}

    # the launcher and the command palette offer the commands
    card = page.locator(".jp-LauncherCard", has_text="Convert to UWS")
    card.first.wait_for(timeout=60_000)  # the launcher renders after the page is up (slowly on a busy machine)
    assert card.count() == 1
    page.keyboard.press("Control+Shift+C")
    page.locator(".lm-CommandPalette-input").fill("UWS")
    palette = page.locator(".lm-CommandPalette-item").all_inner_texts()
    assert any("Convert to UWS store" in t for t in palette) and any("Validate a UWS Store" in t for t in palette), palette
    page.keyboard.press("Escape")

    # right-click the folder of checkpoints -> the converter, sources filled in
    context_menu(page, "ckpts", "Convert to UWS store…")
    conv = page.locator(f"{CURRENT} .uws-lab-converter")
    conv.wait_for()
    assert conv.locator(".uws-sources").input_value() == "ckpts"
    assert conv.locator(".uws-output").input_value() == "ckpts.uws"
    conv.locator(".uws-rank-mode").select_option("rank")
    conv.locator(".uws-rank").fill("2")
    conv.locator(".uws-plan-button").click()
    conv.locator(".uws-plan-facts").wait_for()
    assert "4" in conv.locator(".uws-plan-facts").inner_text()
    conv.locator(".uws-run-button").click()
    page.wait_for_function("() => document.querySelector('.uws-lab-converter .uws-converter')?.dataset.status === 'done'",
                           timeout=120_000)
    assert "4 models" in conv.locator(".uws-message").inner_text()
    shot(page, "converter")

    # the new store shows up in the file browser with the UWS icon
    store_row = row(page, "ckpts.uws", "uws-store")
    store_row.wait_for(timeout=30_000)
    assert store_row.locator("svg").count() >= 1
    shot(page, "file-browser", ".jp-FileBrowser")

    # double-click opens the inspector in a tab (no kernel), the file browser stays where it was
    store_row.dblclick()
    insp = page.locator(f"{CURRENT} .uws-lab-inspector")
    insp.locator(".uws-card-value").first.wait_for()
    page.locator(".uws-heatmap").first.wait_for(state="visible")
    assert row(page, "ckpts").is_visible()
    sessions = json.loads(page.evaluate("fetch('/api/sessions').then(r => r.text())"))
    # no kernel for this test's work (sessions other browser tests opened on the shared server are theirs)
    assert [x["id"] for x in sessions if x["id"] not in earlier_sessions] == []

    info = info_json(root, "ckpts.uws")
    sm = info["summary"]
    cards = insp.locator(".uws-card-value").all_inner_texts()
    assert cards[0] == str(sm["n_models"]) == "4"
    assert cards[1] == str(sm["n_tensors"])
    assert cards[2] == f"{sm['ratio']:.2f}×"
    assert cards[3] == fmt_err(sm["error_max"]), (cards, sm["error_max"])
    insp.locator(".uws-tab[data-tab='tensors']").click()
    names = insp.locator(".uws-panel[data-tab='tensors'] tbody tr").evaluate_all("rs => rs.map(r => r.dataset.key)")
    assert sorted(names) == sorted(t["name"] for t in info["tensors"])
    shown_err = {r: t for r, t in zip(names, insp.locator(".uws-panel[data-tab='tensors'] tbody tr td:last-child")
                                      .all_inner_texts())}
    assert all(shown_err[t["name"]] == fmt_err(t["error_max"]) for t in info["tensors"]), (shown_err, info["tensors"])
    sub = next(t["name"] for t in info["tensors"] if t["encoding"] == "subspace")
    insp.locator(f".uws-panel[data-tab='tensors'] tbody tr[data-key='{sub}']").click()
    insp.locator(".uws-chart").first.wait_for()
    assert "null baseline" in insp.locator(".uws-spectrum").inner_text() or insp.locator(".uws-verdict").count()
    shot(page, "inspector-spectrum")
    insp.locator(".uws-tab[data-tab='overview']").click()
    page.wait_for_timeout(300)
    path = shot(page, "inspector")
    DOC_SHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, DOC_SHOT)

    # right-click the store -> Export model… -> the models tab; export m1 next to the store
    context_menu(page, "ckpts.uws", "Export model…")
    models = insp.locator(".uws-panel[data-tab='models']")
    models.wait_for(state="visible")
    models.locator("tbody tr[data-key='m1']").click()
    assert insp.locator(".uws-export-path").input_value() == "m1.safetensors"
    insp.locator(".uws-export-button").click()
    insp.locator(".uws-export-status.uws-success").wait_for()
    shot(page, "inspector-export")
    import torch
    from safetensors.torch import load_file

    import uwsfmt

    got = load_file(str(root / "m1.safetensors"))
    with uwsfmt.open(root / "ckpts.uws") as st:
        expect = st.state_dict("m1")
    assert set(got) == set(expect) and all(torch.equal(got[k], expect[k]) for k in got)
    row(page, "m1.safetensors").wait_for(timeout=30_000)

    # right-click the store -> Validate
    context_menu(page, "ckpts.uws", "Validate")
    dialog = page.locator(".jp-Dialog")
    dialog.locator(".uws-validate-result[data-valid='true']").wait_for()
    assert "valid UWS store" in dialog.inner_text()
    shot(page, "validate", ".jp-Dialog-content")
    dialog.locator(".jp-mod-accept").click()

    # right-click the store -> Add checkpoints… -> the converter in "add" mode on that store
    more = family(6)
    write(root / "more", {k: more[k] for k in ("m4", "m5")})
    context_menu(page, "ckpts.uws", "Add checkpoints…")
    add = page.locator(f"{CURRENT} .uws-lab-converter")
    add.wait_for()
    assert add.locator(".uws-action").input_value() == "add"
    assert add.locator(".uws-output").input_value() == "ckpts.uws"
    add.locator(".uws-sources").fill("more")
    add.locator(".uws-run-button").click()
    page.wait_for_function(f"() => document.querySelector('{CURRENT} .uws-lab-converter .uws-converter')?.dataset.status === 'done'",
                           timeout=120_000)
    assert "Added 2 model(s)" in add.locator(".uws-message").inner_text()
    assert info_json(root, "ckpts.uws")["summary"]["n_models"] == 6
    shot(page, "converter-added-from-browser")

    assert not lab.js_errors, lab.js_errors


def server_jobs(page, output: str) -> list[dict]:
    jobs = json.loads(page.evaluate("fetch('/uwsfmt/jobs').then(r => r.text())"))["jobs"]
    return [j for j in jobs if j.get("output") == output]


def start_slow_convert(page, source: str, output: str):
    """Right-click ``source`` -> convert to ``output`` (a *slow* name: see slow_jobs.py); return the panel
    once the server job has taken a step and is still running."""
    context_menu(page, source, "Convert to UWS store…")
    conv = page.locator(f"{CURRENT} .uws-lab-converter")
    conv.locator(".uws-output").fill(output)
    conv.locator(".uws-rank-mode").select_option("rank")
    conv.locator(".uws-rank").fill("2")
    conv.locator(".uws-run-button").click()
    page.wait_for_function(
        "(out) => [...document.querySelectorAll('.uws-lab-converter')].some(e => e.querySelector('.uws-output')?.value === out"
        " && e.querySelector('.uws-converter')?.dataset.status === 'running'"
        " && /^[1-9]/.test(e.querySelector('.uws-progress-text')?.textContent || ''))", arg=output, timeout=60_000)
    return conv


def test_cancel_and_reload_while_a_job_runs(lab):
    """Cancel leaves nothing behind; a page reload reattaches the restored tab to the job still running."""
    root = lab.root
    write(root / "family", family(4))
    page = open_lab(lab)

    # Cancel: the job stops at its next step, its temporary build is removed, no store appears
    conv = start_slow_convert(page, "family", "slow-cancel.uws")
    building = [n for n in os.listdir(root) if "slow-cancel" in n]
    assert building and all(n.startswith(".") for n in building), building  # the build happens out of sight
    assert conv.locator(".uws-cancel-button").is_visible()
    conv.locator(".uws-cancel-button").click()
    page.wait_for_function("() => document.querySelector('.uws-lab-converter .uws-converter')?.dataset.status === 'cancelled'",
                           timeout=60_000)
    assert "Cancelled" in conv.locator(".uws-message").inner_text()
    (job,) = server_jobs(page, "slow-cancel.uws")
    assert job["status"] == "cancelled" and job["progress"]["done"] < job["progress"]["total"], job["progress"]
    assert [n for n in os.listdir(root) if "slow-cancel" in n] == []
    assert not conv.locator(".uws-cancel-button").is_visible()
    assert not row(page, "slow-cancel.uws").count()
    shot(page, "converter-cancelled")

    # Reload mid-job: the server goes on; the restored tab finds the same job, shows it running, then done
    start_slow_convert(page, "family", "slow-reload.uws")
    (job,) = server_jobs(page, "slow-reload.uws")
    page.wait_for_timeout(500)  # the layout is saved with the job's id
    page.reload()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.uws-lab-converter')].some(e => e.querySelector('.uws-output')?.value === 'slow-reload.uws'"
        " && e.querySelector('.uws-converter')?.dataset.status === 'running')", timeout=90_000)
    still = server_jobs(page, "slow-reload.uws")
    assert [j["id"] for j in still] == [job["id"]] and still[0]["status"] == "running", still  # reattached, not rerun
    shot(page, "converter-reattached")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.uws-lab-converter')].some(e => e.querySelector('.uws-output')?.value === 'slow-reload.uws'"
        " && e.querySelector('.uws-converter')?.dataset.status === 'done')", timeout=120_000)
    assert (root / "slow-reload.uws").is_dir()
    with __import__("uwsfmt").open(root / "slow-reload.uws") as st:
        assert st.summary()["n_models"] == 4
    row(page, "slow-reload.uws", "uws-store").wait_for(timeout=30_000)
    assert not lab.js_errors, lab.js_errors
