// The converter in a JupyterLab tab: the notebook widget's view (./views/converter.js); the job
// runs in the server (jupyter_ext/server/tasks.py), so a reloaded page reattaches by the job's id.
import { Widget } from '@lumino/widgets';

import { api, post } from './api';
import { ViewModel } from './model';
import { render } from './views/converter.js';

const FORM_OPTIONS = ['action', 'skip_existing', 'rank_mode', 'tau', 'rank', 'center', 'mode', 'residual_bits',
  'max_error', 'basis', 'mean_dtype', 'device', 'overwrite'];

export const CONVERTER_STATE: Record<string, any> = {
  sources: '', output: '', action: 'create', skip_existing: true, rank_mode: 'auto', tau: 0.99, rank: 16,
  center: true, mode: 'auto', modes: ['auto', 'left', 'right', 'both', 'flat'], residual_bits: 0,
  residual_choices: [0, 16, 8, 4, 2], max_error: null, basis: 'exact', mean_dtype: 'auto', device: 'cpu',
  devices: ['cpu'], overwrite: false, status: 'idle', plan_report: {}, progress: {}, log: [], summary: {},
  message: '', message_kind: ''
};

/** Sources as the widget reads them: one per line, commas also separate, `#` comments skipped. */
export function splitSources(text: string): string[] {
  const out: string[] = [];
  for (const raw of String(text || '').split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) {
      continue;
    }
    out.push(...line.split(',').map(p => p.trim()).filter(p => p));
  }
  return out;
}

function dirname(p: string): string {
  const i = p.lastIndexOf('/');
  return i < 0 ? '' : p.slice(0, i);
}

function basename(p: string): string {
  return p.slice(p.lastIndexOf('/') + 1);
}

/** Where a store made from these sources goes by default: next to them. */
export function suggestOutput(sources: string[]): string {
  if (!sources.length) {
    return '';
  }
  const first = sources[0].replace(/\/+$/, '');
  const parent = dirname(first);
  const join = (d: string, n: string) => (d ? `${d}/${n}` : n);
  if (sources.length === 1 && !/\.(safetensors|bin|pt|pth|ckpt)$/i.test(first)) {
    return join(parent, basename(first) + '.uws'); // a folder of checkpoints, or one HF/PEFT folder
  }
  const stem = basename(parent) || 'family';
  return join(parent, stem + '.uws');
}

export interface IConverterOptions {
  sources?: string[];
  output?: string;
  action?: 'create' | 'add';
  job?: string;
  onWritten?: (path: string) => void;
  openInspector?: (path: string) => void;
}

export class ConverterView extends Widget {
  readonly model = new ViewModel(CONVERTER_STATE);

  constructor(options: IConverterOptions = {}) {
    super();
    this.addClass('uws-lab-panel');
    this.addClass('uws-lab-converter');
    this._options = options;
    const sources = options.sources || [];
    this.model.update({
      sources: sources.join('\n'),
      action: options.action || 'create',
      output: options.output ?? suggestOutput(sources)
    });
    render({ model: this.model, el: this.node });
    this.model.onSend = msg => void this._on(msg);
    this.ready = this._init(options.job);
  }

  ready: Promise<void>;

  /** The id of the server job this panel shows ('' before Run). */
  get jobId(): string {
    return this._job;
  }

  /** What restoring this panel after a reload needs. */
  get state(): Record<string, any> {
    return { job: this._job, sources: splitSources(this.model.get('sources')), output: this.model.get('output'),
      action: this.model.get('action') };
  }

  dispose(): void {
    this._stopPolling();
    super.dispose();
  }

  private async _init(job?: string): Promise<void> {
    try {
      const cfg = await api('config');
      this.model.update({ devices: cfg.devices, modes: cfg.modes, residual_choices: cfg.residual_choices });
      if (!cfg.devices.includes(this.model.get('device'))) {
        this.model.set('device', cfg.devices[cfg.devices.length - 1]);
      }
    } catch (e) {
      this._say((e as Error).message, 'error');
    }
    if (job) {
      await this.attach(job);
    }
  }

  private _say(message: string, kind: string): void {
    this.model.update({ message, message_kind: kind });
  }

  private _body(): Record<string, any> {
    const options: Record<string, any> = {};
    for (const k of FORM_OPTIONS) {
      options[k] = this.model.get(k);
    }
    return { sources: splitSources(this.model.get('sources')), output: String(this.model.get('output') || '').trim(),
      options };
  }

  private async _on(msg: any): Promise<void> {
    if (!msg || typeof msg !== 'object') {
      return;
    }
    if (msg.form && typeof msg.form === 'object') {
      this.model.update(msg.form);
    }
    const st = this.model.get('status');
    const busy = st === 'planning' || st === 'running' || st === 'cancelling';
    if (msg.action === 'plan' && !busy) {
      await this.plan();
    } else if (msg.action === 'run' && !busy) {
      await this.run();
    } else if (msg.action === 'cancel') {
      await this.cancel();
    } else if (msg.action === 'open_inspector') {
      const out = this._resultPath || String(this.model.get('output') || '').trim();
      if (out && this._options.openInspector) {
        this._options.openInspector(out);
      }
    }
  }

  async plan(): Promise<void> {
    const body = this._body();
    if (!body.sources.length) {
      this.model.set('status', 'error');
      this._say('Enter at least one source: a checkpoint file, a folder of checkpoints or a glob such as '
        + 'adapters/*/adapter_model.safetensors.', 'error');
      return;
    }
    this.model.update({ status: 'planning', plan_report: {} });
    this._say(`Reading the headers of ${body.sources.length} source(s) …`, 'info');
    try {
      const r = await post('plan', body);
      const conflicts = r.conflicts || [];
      this.model.update({ plan_report: r, status: 'planned' });
      if (Array.isArray(r.new)) {
        const counts = `${r.new.length} new model(s), ${(r.existing || []).length} already in the store`;
        this._say(conflicts.length ? `${counts}; ${conflicts.length} conflict(s) below would stop the run.`
          : `${counts}: the sources fit the store. Run adds them.`, conflicts.length ? 'error' : 'success');
      } else {
        this._say(conflicts.length ? `These sources do not form one family (${conflicts.length} conflict(s) below).`
          : `${r.n_models} models form one family. Choose the options and Run.`, conflicts.length ? 'error' : 'success');
      }
    } catch (e) {
      this.model.set('status', 'error');
      this._say((e as Error).message, 'error');
    }
  }

  async run(): Promise<void> {
    const body = this._body();
    this.model.update({ status: 'running', summary: {}, log: [],
      progress: { done: 0, total: 0, message: 'starting', elapsed: 0, eta: null } });
    this._say(body.options.action === 'add' ? 'Adding to the store …' : 'Converting …', 'info');
    try {
      const job = await post('jobs', body);
      await this.attach(job.id);
    } catch (e) {
      this.model.set('status', 'error');
      this._say((e as Error).message, 'error');
    }
  }

  async cancel(): Promise<void> {
    if (!this._job) {
      return;
    }
    try {
      this._show(await api(`jobs/${this._job}`, { method: 'DELETE' }));
      this._say('Cancelling at the next step …', 'info');
    } catch (e) {
      this._say((e as Error).message, 'error');
    }
  }

  /** Show a server job (after Run, or after a page reload) and follow it until it ends. */
  async attach(jobId: string): Promise<void> {
    this._job = jobId;
    this.model.set('job', jobId); // the tab's restore data follows (see index.ts)
    this._stopPolling();
    try {
      const st = await api(`jobs/${jobId}`);
      this.model.update({ sources: (st.sources || []).join('\n'), output: st.output || '' });
      if (st.options) {
        this.model.update(st.options);
      }
      this._show(st);
    } catch (e) {
      this.model.set('status', 'error');
      this._say((e as Error).message, 'error');
      return;
    }
    this._timer = window.setInterval(() => void this._poll(), 400);
  }

  private async _poll(): Promise<void> {
    if (!this._job || this._polling) {
      return;
    }
    this._polling = true;
    try {
      this._show(await api(`jobs/${this._job}`));
    } catch (e) {
      this._stopPolling();
      this.model.set('status', 'error');
      this._say((e as Error).message, 'error');
    } finally {
      this._polling = false;
    }
  }

  private _show(st: any): void {
    const status = st.status === 'queued' ? 'running' : st.status;
    const finished = status === 'done' || status === 'error' || status === 'cancelled';
    this.model.update({ progress: st.progress || {}, log: st.log || [] });
    if (status === 'done') {
      this._resultPath = st.report?.output || st.output;
      this.model.update({ summary: st.report?.summary || {} });
    }
    this.model.set('status', status);
    if (finished || st.message) {
      this._say(st.message || '', status === 'done' ? 'success' : status === 'error' ? 'error' : 'info');
    }
    if (finished) {
      this._stopPolling();
      if (status === 'done' && this._options.onWritten) {
        this._options.onWritten(this._resultPath);
      }
    }
  }

  private _stopPolling(): void {
    if (this._timer) {
      window.clearInterval(this._timer);
      this._timer = 0;
    }
  }

  private _options: IConverterOptions;
  private _job = '';
  private _timer = 0;
  private _polling = false;
  private _resultPath = '';
}
