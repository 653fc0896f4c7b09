"""End-to-end checks in a real JupyterLab + chromium (see conftest.py for the harness)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROBE_WIDGET = textwrap.dedent('''
    import anywidget
    import traitlets

    class Probe(anywidget.AnyWidget):
        _esm = """
        function render({ model, el }) {
          const span = document.createElement("span");
          span.className = "uws-probe";
          const show = () => { span.textContent = String(model.get("value")); };
          model.on("change:value", show);
          show();
          el.appendChild(span);
        }
        export default { render };
        """
        value = traitlets.Int(0).tag(sync=True)

    Probe(value=42)
''')


def test_harness_renders_anywidget(lab):
    """The harness itself: a notebook with a trivial anywidget shows its number."""
    lab.write_notebook("probe.ipynb", [PROBE_WIDGET])
    page = lab.open("probe.ipynb")
    lab.run_all(page)
    probe = page.locator(".uws-probe")
    probe.wait_for(timeout=60_000)
    assert probe.inner_text() == "42"
    lab.screenshot(page, "probe")


INSPECTOR_CELLS = [
    textwrap.dedent('''
        import time
        from jupyter_ext import Inspector
        from tests.browser.fake_store import FakeStore
        store = FakeStore(n_models=500, n_tensors=300)
    '''),
    textwrap.dedent('''
        w = Inspector(store)
        print(f"opened in {w.open_seconds:.3f} s")
        w
    '''),
]


def test_inspector_500x300(lab):
    """Inspector over a 500-model x 300-tensor (fake) store: summary, heatmap, tables, spectrum, export."""
    import time

    lab.write_notebook("inspector.ipynb", INSPECTOR_CELLS)
    page = lab.open("inspector.ipynb")
    t0 = time.monotonic()
    lab.run_all(page)
    root = page.locator(".uws-inspector")
    root.wait_for(timeout=60_000)
    page.locator(".uws-heatmap").wait_for(state="visible")
    shown_s = time.monotonic() - t0
    opened = float(page.locator(".jp-OutputArea-output pre", has_text="opened in").inner_text().split()[2])
    assert opened < 2.0
    print(f"Inspector 500x300: python {opened:.3f} s, run-all -> heatmap visible {shown_s:.1f} s")

    # overview: summary cards and the heatmap geometry
    cards = root.locator(".uws-card-value").all_inner_texts()
    assert cards[:2] == ["500", "300"] and "25.00×" in cards
    box = page.locator(".uws-heatmap").bounding_box()
    assert box["width"] >= 300 and box["height"] >= 500
    page.locator(".uws-heatmap").hover(position={"x": 1.5, "y": 0.5})  # first cell: model 0, tensor 0
    tip = page.locator(".uws-tooltip").inner_text()
    assert "model model-000" in tip and "layers.0.q.weight" in tip
    lab.screenshot(page, "inspector-overview", ".uws-inspector")

    # tensors: sortable, filterable table; selecting a row loads its spectrum
    root.locator(".uws-tab[data-tab=tensors]").click()
    rows = root.locator(".uws-panel[data-tab=tensors] tbody tr")
    assert rows.count() == 300
    root.locator(".uws-panel[data-tab=tensors] th[data-key=name]").click()
    assert rows.first.locator("td").first.inner_text() == "layers.0.k.weight"
    root.locator(".uws-panel[data-tab=tensors] th[data-key=name]").click()  # descending
    assert rows.first.locator("td").first.inner_text() == "layers.99.v.weight"
    root.locator(".uws-enc-filter").select_option("subspace")
    root.locator(".uws-panel[data-tab=tensors] .uws-filter").fill("layers.1.")
    names = rows.locator("td:first-child").all_inner_texts()
    assert names and all("layers.1" in n for n in names)
    rows.filter(has_text="layers.1.q.weight").first.click()
    spectrum = root.locator(".uws-spectrum")
    spectrum.locator("svg.uws-chart").first.wait_for()
    assert spectrum.locator("svg.uws-chart").count() == 2
    assert spectrum.locator("path.uws-series[data-name='null baseline']").count() == 1
    assert "kept k=" in spectrum.inner_text() and "τ = 0.99" in spectrum.inner_text()
    assert "rise above the null baseline" in spectrum.inner_text()
    lab.screenshot(page, "inspector-tensors", ".uws-inspector")

    # models: select one, export it (the fake store records the call)
    root.locator(".uws-tab[data-tab=models]").click()
    mrows = root.locator(".uws-panel[data-tab=models] tbody tr")
    assert mrows.count() == 500
    mrows.nth(3).click()
    path_input = root.locator(".uws-export-path")
    page.wait_for_function("() => document.querySelector('.uws-export-path').value === 'model-003.safetensors'")
    assert path_input.input_value() == "model-003.safetensors"
    root.locator(".uws-export-button").click()
    status = root.locator(".uws-export-status")
    status.filter(has_text="Exported model-003").wait_for()
    lab.screenshot(page, "inspector-models", ".uws-inspector")
    assert not lab.js_errors, lab.js_errors


CONVERTER_CELLS = [
    textwrap.dedent('''
        import torch
        from pathlib import Path
        from safetensors.torch import save_file
        g = torch.Generator().manual_seed(0)
        Path("fam").mkdir(exist_ok=True)
        base, basis = torch.randn(64, 48, generator=g), torch.randn(64, 3, generator=g)
        for i in range(6):
            w = base + 0.05 * basis @ torch.randn(3, 48, generator=g)
            save_file({"layer.weight": w.contiguous(), "layer.bias": torch.full((64,), float(i))}, f"fam/m{i}.safetensors")
        Path("empty").mkdir(exist_ok=True)
        Path("more").mkdir(exist_ok=True)
        for i in (6, 7):  # two fine-tunes that arrive later
            w = base + 0.05 * basis @ torch.randn(3, 48, generator=g)
            save_file({"layer.weight": w.contiguous(), "layer.bias": torch.full((64,), float(i))}, f"more/m{i}.safetensors")
    '''),
    textwrap.dedent('''
        from jupyter_ext import Converter
        c = Converter(sources="does/not/exist", output="fam.uws")
        c
    '''),
]


def test_converter_plan_run_open(lab):
    """Converter in a real kernel: bad input -> message; plan; run with progress; open the result."""
    lab.write_notebook("converter.ipynb", CONVERTER_CELLS)
    page = lab.open("converter.ipynb")
    lab.run_all(page)
    root = page.locator(".uws-converter")
    root.wait_for(timeout=60_000)
    msg = root.locator(".uws-message")

    # bad input: a message in the widget, no traceback in the notebook
    root.locator(".uws-plan-button").click()
    msg.filter(has_text="no such file or directory").wait_for()
    root.locator(".uws-sources").fill("empty")
    root.locator(".uws-plan-button").click()
    msg.filter(has_text="holds no checkpoint").wait_for()
    assert "Traceback" not in root.inner_text()

    root.locator(".uws-sources").fill("fam/*.safetensors")
    root.locator(".uws-plan-button").click()
    msg.filter(has_text="6 models form one family").wait_for()
    assert "6" in root.locator(".uws-plan-facts").inner_text()

    root.locator(".uws-rank-mode").select_option("rank")
    root.locator(".uws-rank").fill("3")
    root.locator(".uws-basis").select_option("sketch")
    root.locator(".uws-mean-dtype").select_option("float16")
    root.locator(".uws-run-button").click()
    page.wait_for_function("() => document.querySelector('.uws-converter').dataset.status === 'done'", timeout=120_000)
    assert "Done in" in msg.inner_text()
    manifest = json.loads((lab.root / "fam.uws" / "zarr.json").read_text())["attributes"]["uws"]
    assert manifest["format_version"] == "1.1"  # the float16 means chosen in the form
    assert root.locator(".uws-progress").get_attribute("aria-valuenow") == "100"
    assert "6" in root.locator(".uws-summary .uws-card-value").first.inner_text()
    lab.screenshot(page, "converter-done", ".uws-converter")

    root.locator(".uws-open-button").click()
    insp = page.locator(".uws-inspector")
    insp.wait_for(timeout=60_000)
    assert insp.locator(".uws-card-value").first.inner_text() == "6"
    insp.locator(".uws-tab[data-tab=tensors]").click()
    insp.locator("tbody tr", has_text="layer.weight").first.click()
    insp.locator(".uws-spectrum svg.uws-chart").first.wait_for()
    assert "kept k=3" in insp.locator(".uws-spectrum").inner_text()
    assert "exact bases" in insp.locator(".uws-spectrum").inner_text()  # 48 columns: too narrow to sketch
    lab.screenshot(page, "converter-inspector")

    # later fine-tunes go into the same store: the options that shape new bases disappear
    root.locator(".uws-action").select_option("add")
    root.locator(".uws-rank-mode").wait_for(state="hidden")
    assert root.locator(".uws-add-hint").is_visible() and not root.locator(".uws-overwrite").is_visible()
    root.locator(".uws-sources").fill("more/*.safetensors")
    root.locator(".uws-plan-button").click()
    msg.filter(has_text="2 new model(s), 0 already in the store").wait_for()
    assert "m6, m7" in root.locator(".uws-plan-facts").inner_text()
    root.locator(".uws-run-button").click()
    page.wait_for_function("() => document.querySelector('.uws-converter').dataset.status === 'done' && "
                           "document.querySelector('.uws-converter .uws-message').textContent.startsWith('Added')", timeout=120_000)
    assert "Added 2 model(s)" in msg.inner_text()
    assert root.locator(".uws-summary .uws-card-value").first.inner_text() == "8"
    lab.screenshot(page, "converter-added", ".uws-converter")
    assert not lab.js_errors, lab.js_errors


CANCEL_CELLS = [
    textwrap.dedent('''
        import time
        import uwsfmt
        from jupyter_ext import Converter

        def slow_convert(sources, out, *, progress=None, cancel=None, **kw):
            # stands in for a long build: 600 steps of 20 ms, honouring cancel like the library
            for i in range(1, 601):
                if cancel is not None and cancel.is_set():
                    raise uwsfmt.Cancelled("cancelled by the user; nothing was written at the target")
                time.sleep(0.02)
                progress(i, 600, f"tensor {i}")
            raise AssertionError("not cancelled")

        uwsfmt.convert = slow_convert
        c = Converter(sources="anything", output="never.uws")
        c
    '''),
]


def test_converter_progress_and_cancel(lab):
    """Progress/ETA arrive from the kernel's loop while the worker runs; Cancel stops it."""
    lab.write_notebook("cancel.ipynb", CANCEL_CELLS)
    page = lab.open("cancel.ipynb")
    lab.run_all(page)
    root = page.locator(".uws-converter")
    root.wait_for(timeout=60_000)
    root.locator(".uws-run-button").click()
    text = root.locator(".uws-progress-text")
    text.filter(has_text="ETA").wait_for(timeout=30_000)
    page.wait_for_function(
        "() => +document.querySelector('.uws-progress').getAttribute('aria-valuenow') >= 5", timeout=30_000)
    lab.screenshot(page, "converter-running", ".uws-converter")
    assert root.locator(".uws-cancel-button").is_enabled()
    root.locator(".uws-cancel-button").click()
    page.wait_for_function("() => document.querySelector('.uws-converter').dataset.status === 'cancelled'")
    assert "Nothing was written at never.uws" in root.locator(".uws-message").inner_text()
    assert int(root.locator(".uws-progress").get_attribute("aria-valuenow")) < 100
    assert not lab.js_errors, lab.js_errors


def test_example_notebook_in_lab(lab):
    """examples/quickstart.ipynb, run as a user would: both widgets render and the conversion finishes."""
    import shutil

    shutil.copy(REPO_ROOT / "examples" / "quickstart.ipynb", lab.root / "quickstart.ipynb")
    page = lab.open("quickstart.ipynb")
    lab.run_all(page, timeout_ms=240_000)
    conv = page.locator(".uws-converter")
    conv.wait_for(timeout=60_000)
    page.wait_for_function("() => document.querySelector('.uws-converter').dataset.status === 'done'")
    insp = page.locator(".uws-inspector").first
    insp.wait_for()
    insp.scroll_into_view_if_needed()
    # the rendered numbers are the store's own (read here, independently of the widget)
    import uwsfmt

    with uwsfmt.open(lab.root / "family.uws") as store:
        sm = store.summary()
    cards = insp.locator(".uws-card-value").all_inner_texts()
    assert cards[0] == "12" == str(sm["n_models"])
    assert cards[1] == str(sm["n_tensors"])
    assert cards[2] == f"{sm['ratio']:.2f}×", (cards, sm["ratio"])
    assert cards[5] == sm["format_version"]
    assert insp.locator(".uws-heatmap").is_visible()
    insp.locator(".uws-tab[data-tab=tensors]").click()
    insp.locator(".uws-spectrum svg.uws-chart").first.wait_for()
    lab.screenshot(page, "example-converter", ".uws-converter")
    lab.screenshot(page, "example-inspector", ".uws-inspector")
    assert not lab.errors(page) and not lab.js_errors, (lab.errors(page), lab.js_errors)
