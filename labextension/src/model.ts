// A model with anywidget's interface (get / set / on / save_changes / send) held in the page:
// the views in ./views render from it in a JupyterLab panel exactly as they do in a notebook,
// where the model is the kernel-synced widget. The panel's controller answers `send` and
// watches changes where the widget's Python side would.

type Handler = () => void;

export class ViewModel {
  onSend: (msg: any) => void = () => undefined;

  constructor(state: Record<string, any>) {
    this._state = { ...state };
  }

  get(name: string): any {
    return this._state[name];
  }

  set(name: string, value: any): void {
    const old = this._state[name];
    if (old === value || (!(value instanceof DataView) && JSON.stringify(old) === JSON.stringify(value))) {
      return;
    }
    this._state[name] = value;
    for (const fn of [...(this._handlers.get('change:' + name) || [])]) {
      fn();
    }
  }

  update(values: Record<string, any>): void {
    for (const [k, v] of Object.entries(values)) {
      this.set(k, v);
    }
  }

  on(event: string, fn: Handler): void {
    if (!this._handlers.has(event)) {
      this._handlers.set(event, new Set());
    }
    this._handlers.get(event)!.add(fn);
  }

  off(event: string, fn: Handler): void {
    this._handlers.get(event)?.delete(fn);
  }

  save_changes(): void {
    // nothing to sync: the controller reacts to the change events
  }

  send(msg: any): void {
    this.onSend(msg);
  }

  private _state: Record<string, any>;
  private _handlers = new Map<string, Set<Handler>>();
}
