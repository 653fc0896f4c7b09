"""End-to-end checks in a real JupyterLab + chromium (see conftest.py for the harness)."""

from __future__ import annotations

import textwrap

import pytest

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
