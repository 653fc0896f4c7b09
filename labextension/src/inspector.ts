// The inspector in a JupyterLab tab: the notebook widget's view (./views/inspector.js), fed by
// the server extension instead of a kernel.
import { Widget } from '@lumino/widgets';

import { api, post } from './api';
import { ViewModel } from './model';
import { render } from './views/inspector.js';

export const INSPECTOR_STATE: Record<string, any> = {
  path: '', summary: {}, tensors: [], models: [], errors: new DataView(new ArrayBuffer(0)), heatmap: {},
  tab: 'overview', selected_tensor: '', selected_model: '', spectrum: {}, export_format: 'safetensors',
  export_formats: ['safetensors'], export_path: '', export_state: 'idle', export_message: '', message: '',
  message_kind: '', open_seconds: 0
};

/** A file or folder name for an exported model (jupyter_ext.messages.default_export_path). */
export function defaultExportName(modelId: string, fmt: string): string {
  const stem = modelId.replace(/[^A-Za-z0-9._-]+/g, '_').replace(/^[._]+|[._]+$/g, '') || 'model';
  return fmt === 'safetensors' || fmt === 'kohya' ? `${stem}.safetensors` : `${stem}-${fmt}`;
}

function base64ToDataView(b64: string): DataView {
  const bin = atob(b64 || '');
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) {
    bytes[i] = bin.charCodeAt(i);
  }
  return new DataView(bytes.buffer);
}

export class InspectorView extends Widget {
  readonly model = new ViewModel(INSPECTOR_STATE);

  constructor(path: string, options: { onWritten?: () => void; tab?: string } = {}) {
    super();
    this.addClass('uws-lab-panel');
    this.addClass('uws-lab-inspector');
    this._path = path;
    this._onWritten = options.onWritten || (() => undefined);
    this.model.set('path', path);
    if (options.tab) {
      this.model.set('tab', options.tab);
    }
    render({ model: this.model, el: this.node });
    this.model.on('change:selected_tensor', () => void this._spectrum());
    this.model.on('change:selected_model', () => this._suggestPath(true));
    this.model.on('change:export_format', () => this._suggestPath(false));
    this.model.onSend = msg => {
      if (msg && msg.action === 'export') {
        void this.exportModel();
      }
    };
    this.ready = this.load();
  }

  ready: Promise<void>;

  get path(): string {
    return this._path;
  }

  showTab(tab: string): void {
    this.model.set('tab', tab);
  }

  /** (Re)read the store's metadata: summary, tables, heatmap. */
  async load(): Promise<void> {
    this._spectra.clear();
    this.model.update({ message: 'Opening ' + this._path + ' …', message_kind: 'info' });
    try {
      const v = await api('store', {}, { path: this._path });
      const formats: string[] = v.export_formats || ['safetensors'];
      this._exportDir = v.export_dir || '';
      this.model.update({
        summary: v.summary, tensors: v.tensors, models: v.models, heatmap: v.heatmap,
        errors: base64ToDataView(v.errors), export_formats: formats, open_seconds: v.open_seconds,
        spectrum: {}, export_state: 'idle', export_message: '', message: '', message_kind: ''
      });
      if (!formats.includes(this.model.get('export_format'))) {
        this.model.set('export_format', formats[0]);
      }
      if (this.model.get('selected_tensor')) {
        void this._spectrum();
      }
    } catch (e) {
      this.model.update({
        summary: {}, tensors: [], models: [], heatmap: {}, errors: new DataView(new ArrayBuffer(0)),
        message: `Cannot open ${this._path}: ${(e as Error).message}`, message_kind: 'error'
      });
    }
  }

  private async _spectrum(): Promise<void> {
    const name = this.model.get('selected_tensor');
    if (!name) {
      this.model.set('spectrum', {});
      return;
    }
    let sp = this._spectra.get(name);
    if (!sp) {
      try {
        sp = await api('spectrum', {}, { path: this._path, tensor: name });
      } catch (e) {
        sp = { name, unavailable: (e as Error).message };
      }
      this._spectra.set(name, sp);
    }
    if (this.model.get('selected_tensor') === name) {
      this.model.set('spectrum', sp);
    }
  }

  private _suggestPath(modelChanged: boolean): void {
    const id = this.model.get('selected_model');
    if (!id) {
      return;
    }
    const current = this.model.get('export_path');
    if (current && current !== this._autoPath) {
      return; // the user's own path
    }
    const name = defaultExportName(id, this.model.get('export_format'));
    this._autoPath = this._exportDir ? `${this._exportDir}/${name}` : name;
    this.model.set('export_path', this._autoPath);
    if (modelChanged) {
      this.model.update({ export_state: 'idle', export_message: '' });
    }
  }

  /** Export the selected model through the server (a path relative to the server's root). */
  async exportModel(): Promise<void> {
    const model = this.model.get('selected_model');
    const format = this.model.get('export_format');
    const output = String(this.model.get('export_path') || '').trim();
    if (!model) {
      this.model.update({ export_state: 'error', export_message: 'Select a model in the list first.' });
      return;
    }
    if (!output) {
      this.model.update({ export_state: 'error', export_message: 'Enter the path to export to.' });
      return;
    }
    if (this.model.get('export_state') === 'running') {
      return;
    }
    this.model.update({ export_state: 'running', export_message: `Exporting ${model} as ${format} to ${output} …` });
    try {
      const r = await post('export', { path: this._path, model, format, output });
      this.model.update({ export_state: 'done', export_message: r.message });
      this._onWritten();
    } catch (e) {
      this.model.update({ export_state: 'error', export_message: (e as Error).message });
    }
  }

  private _path: string;
  private _exportDir = '';
  private _autoPath = '';
  private _onWritten: () => void;
  private _spectra = new Map<string, any>();
}
