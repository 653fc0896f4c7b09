// A sortable, filterable table over an array of row objects.
import { h } from "./format.js";

/**
 * makeTable({columns, rowKey, onSelect, emptyText, limit})
 * columns: [{key, label, render?(row) -> Node|string, sort?(row) -> value, align, title}]
 * returns {el, update(rows, filterFn, selectedKey)}
 */
export function makeTable(o) {
  const state = { sortKey: o.sortKey || null, desc: !!o.desc, rows: [], filter: null, selected: null };
  const table = h("table", { class: "uws-table" });
  const thead = h("thead");
  const tbody = h("tbody");
  const note = h("div", { class: "uws-table-note" });
  table.append(thead, tbody);
  const wrap = h("div", { class: "uws-table-wrap" }, [table]);
  const el = h("div", { class: "uws-table-box" }, [wrap, note]);
  const limit = o.limit || 2000;

  function header() {
    thead.replaceChildren(h("tr", {}, o.columns.map((c) => {
      const active = state.sortKey === c.key;
      return h("th", {
        class: (active ? "uws-sorted " : "") + (c.align === "right" ? "uws-num" : ""),
        title: c.title || `Sort by ${c.label}`,
        "data-key": c.key,
        onclick: () => {
          if (state.sortKey === c.key) state.desc = !state.desc;
          else { state.sortKey = c.key; state.desc = !!c.descFirst; }
          render();
        },
      }, [c.label, h("span", { class: "uws-sort-mark", text: active ? (state.desc ? " ▼" : " ▲") : "" })]);
    })));
  }

  function sortValue(c, row) {
    const v = c.sort ? c.sort(row) : row[c.key];
    return v === undefined ? null : v;
  }

  function render() {
    header();
    let rows = state.filter ? state.rows.filter(state.filter) : state.rows.slice();
    const c = o.columns.find((x) => x.key === state.sortKey);
    if (c) {
      const sign = state.desc ? -1 : 1;
      rows.sort((a, b) => {
        const va = sortValue(c, a), vb = sortValue(c, b);
        if (va === null && vb === null) return 0;
        if (va === null) return 1; // missing values last, whatever the direction
        if (vb === null) return -1;
        if (typeof va === "number" && typeof vb === "number") return sign * (va - vb);
        return sign * String(va).localeCompare(String(vb), undefined, { numeric: true });
      });
    }
    const shown = rows.slice(0, limit);
    tbody.replaceChildren(...shown.map((row) => {
      const key = row[o.rowKey];
      const tr = h("tr", { class: key === state.selected ? "uws-selected" : "", "data-key": key,
                           onclick: () => o.onSelect && o.onSelect(row) },
        o.columns.map((col) => {
          const v = col.render ? col.render(row) : row[col.key];
          return h("td", { class: col.align === "right" ? "uws-num" : "", title: col.cellTitle ? col.cellTitle(row) : null },
                   [v === null || v === undefined ? "–" : v]);
        }));
      return tr;
    }));
    if (!state.rows.length) note.textContent = o.emptyText || "Nothing to show.";
    else note.textContent = `${rows.length === state.rows.length ? rows.length : rows.length + " of " + state.rows.length} rows`
      + (rows.length > limit ? ` (first ${limit} shown; filter to narrow)` : "");
  }

  return {
    el,
    update(rows, filter, selected) {
      state.rows = rows || [];
      state.filter = filter || null;
      state.selected = selected;
      render();
    },
    select(selected) {
      state.selected = selected;
      for (const tr of tbody.children) tr.classList.toggle("uws-selected", tr.dataset.key === String(selected));
    },
  };
}
