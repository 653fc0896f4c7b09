// uwsfmt's JupyterLab extension: UWS stores open from the file browser in an inspector tab (no
// kernel), checkpoints convert from a right-click, and the same views as the notebook widgets.
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  ICommandPalette,
  InputDialog,
  MainAreaWidget,
  showDialog,
  Dialog,
  ToolbarButton,
  WidgetTracker
} from '@jupyterlab/apputils';
import {
  ABCWidgetFactory,
  DocumentModel,
  DocumentRegistry,
  DocumentWidget,
  IDocumentWidget,
  TextModelFactory
} from '@jupyterlab/docregistry';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { ILauncher } from '@jupyterlab/launcher';
import { Contents } from '@jupyterlab/services';
import { LabIcon, refreshIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { post } from './api';
import { ConverterView, IConverterOptions } from './converter';
import { InspectorView } from './inspector';

const UWS_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">
<rect class="jp-icon-brand0" fill="#1f6feb" x="0" y="2.5" width="16" height="11" rx="2.5"/>
<text x="8" y="10.6" fill="#fff" font-family="Arial, Helvetica, sans-serif" font-size="6.4" font-weight="700"
 text-anchor="middle" letter-spacing="-0.2">UWS</text>
</svg>`;
export const uwsIcon = new LabIcon({ name: 'uwsfmt:store', svgstr: UWS_SVG });

const FACTORY_DIR = 'UWS Inspector (store folder)';
const FACTORY_ZIP = 'UWS Inspector';

namespace CommandIDs {
  export const open = 'uwsfmt:open-inspector';
  export const convert = 'uwsfmt:convert';
  export const add = 'uwsfmt:add-checkpoints';
  export const validate = 'uwsfmt:validate';
  export const exportModel = 'uwsfmt:export-model';
}

/** Nothing in a store is saved from the page: no checkpoint of the folder/zip is made on opening. */
class StoreModel extends DocumentModel {
  get collaborative(): boolean {
    return true; // what the context reads to skip saving and checkpoints
  }
}

/** Store folders and zipped stores open without reading their content into the page (fileFormat null). */
class StoreModelFactory extends TextModelFactory {
  createNew(options: DocumentRegistry.IModelOptions<any> = {}): DocumentModel {
    return new StoreModel({ ...options, collaborationEnabled: false });
  }
  constructor(private _modelName: string, private _kind: Contents.ContentType) {
    super();
  }
  get name(): string {
    return this._modelName;
  }
  get contentType(): Contents.ContentType {
    return this._kind;
  }
  get fileFormat(): Contents.FileFormat {
    return null;
  }
}

class InspectorFactory extends ABCWidgetFactory<IDocumentWidget<InspectorView>> {
  constructor(options: DocumentRegistry.IWidgetFactoryOptions, private _written: () => void) {
    super(options);
  }

  protected createNewWidget(context: DocumentRegistry.Context): IDocumentWidget<InspectorView> {
    const content = new InspectorView(context.path, { onWritten: this._written });
    const widget = new DocumentWidget({ content, context });
    widget.addClass('uws-lab-document');
    widget.title.icon = uwsIcon;
    widget.toolbar.addItem('reload', new ToolbarButton({
      icon: refreshIcon, tooltip: 'Read the store again (after adding models)', onClick: () => void content.load()
    }));
    widget.toolbar.addItem('validate', new ToolbarButton({
      label: 'Validate', tooltip: 'Check the store against the UWS specification',
      onClick: () => void validate(context.path)
    }));
    return widget;
  }
}

async function validate(path: string): Promise<void> {
  let body: HTMLElement;
  let title: string;
  try {
    const r = await post('validate', { path });
    title = r.valid ? `${path}: valid UWS store` : `${path}: INVALID (${r.problems.length} problem(s))`;
    body = document.createElement('div');
    body.className = 'uws-validate-result';
    body.dataset.valid = String(r.valid);
    const lines = r.valid ? ['The store follows the UWS specification.'] : r.problems;
    for (const line of [...lines, ...r.notes.map((n: string) => 'note: ' + n)]) {
      const p = document.createElement('div');
      p.textContent = line;
      body.appendChild(p);
    }
  } catch (e) {
    title = `${path}: cannot be validated`;
    body = document.createElement('div');
    body.className = 'uws-validate-result';
    body.dataset.valid = 'false';
    body.textContent = (e as Error).message;
  }
  await showDialog({ title, body: new WidgetWrap(body), buttons: [Dialog.okButton()] });
}

class WidgetWrap extends Widget {
  constructor(el: HTMLElement) {
    super({ node: el });
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'uwsfmt-jupyterlab:plugin',
  description: 'UWS stores in JupyterLab: inspector tabs, convert from the file browser.',
  autoStart: true,
  requires: [IDefaultFileBrowser],
  optional: [ICommandPalette, ILauncher, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    browser: IDefaultFileBrowser,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    restorer: ILayoutRestorer | null
  ) => {
    const { commands, docRegistry, shell } = app;
    const refresh = () => void browser.model.refresh();

    // ---------------------------------------------------------------- file types + inspector tabs
    docRegistry.addFileType({
      name: 'uws-store', displayName: 'UWS store', extensions: ['.uws'], contentType: 'directory',
      fileFormat: null, icon: uwsIcon
    });
    docRegistry.addFileType({
      name: 'uws-zip', displayName: 'UWS store (zip)', extensions: ['.uws.zip'], contentType: 'file',
      fileFormat: null, mimeTypes: ['application/zip'], icon: uwsIcon
    });
    docRegistry.addFileType({
      name: 'uws-safetensors', displayName: 'safetensors checkpoint', extensions: ['.safetensors'],
      contentType: 'file', fileFormat: null, mimeTypes: ['application/octet-stream']
    });
    docRegistry.addFileType({
      name: 'uws-torch', displayName: 'PyTorch checkpoint', extensions: ['.pt', '.pth', '.bin', '.ckpt'],
      contentType: 'file', fileFormat: null, mimeTypes: ['application/octet-stream']
    });
    docRegistry.addModelFactory(new StoreModelFactory('uws-dir', 'directory'));
    docRegistry.addModelFactory(new StoreModelFactory('uws-zip', 'file'));
    const tracker = new WidgetTracker<IDocumentWidget<InspectorView>>({ namespace: 'uwsfmt-inspector' });
    for (const [name, modelName, types] of [[FACTORY_DIR, 'uws-dir', ['uws-store']], [FACTORY_ZIP, 'uws-zip', ['uws-zip']]] as
      [string, string, string[]][]) {
      const factory = new InspectorFactory({ name, label: 'UWS Inspector', modelName, fileTypes: types,
        defaultFor: types, readOnly: true }, refresh);
      factory.widgetCreated.connect((_, widget) => {
        widget.context.pathChanged.connect(() => void tracker.save(widget));
        void tracker.add(widget);
      });
      docRegistry.addWidgetFactory(factory);
    }
    if (restorer) {
      void restorer.restore(tracker, {
        command: 'docmanager:open',
        args: w => ({ path: w.context.path, factory: w.context.path.endsWith('.zip') ? FACTORY_ZIP : FACTORY_DIR }),
        name: w => w.context.path
      });
    }

    const selectedPath = (): string | undefined => {
      const first = browser.selectedItems().next();
      return first && !first.done ? first.value.path : undefined;
    };
    const selectedPaths = (): string[] => Array.from(browser.selectedItems(), item => item.path);
    const isStore = (p?: string) => !!p && (/\.uws\/?$/.test(p) || p.endsWith('.uws.zip'));

    async function askStore(label: string): Promise<string | undefined> {
      const r = await InputDialog.getText({ title: label, label: 'Store (a path relative to the server root)',
        placeholder: 'family.uws', text: selectedPath() && isStore(selectedPath()) ? selectedPath() : '' });
      return r.button.accept && r.value ? r.value : undefined;
    }

    async function openInspector(path: string, tab?: string): Promise<InspectorView | undefined> {
      const factory = path.endsWith('.zip') ? FACTORY_ZIP : FACTORY_DIR;
      const widget = (await commands.execute('docmanager:open', { path, factory })) as IDocumentWidget<InspectorView>;
      if (widget && tab) {
        widget.content.showTab(tab);
      }
      return widget?.content;
    }

    // ---------------------------------------------------------------- converter tabs
    const converters = new WidgetTracker<MainAreaWidget<ConverterView>>({ namespace: 'uwsfmt-converter' });
    let counter = 0;
    function openConverter(options: IConverterOptions & { id?: string }): MainAreaWidget<ConverterView> {
      const content = new ConverterView({
        ...options,
        onWritten: () => refresh(),
        openInspector: path => void openInspector(path)
      });
      const widget = new MainAreaWidget({ content });
      // a restored tab keeps its id: the restored layout places widgets by it
      widget.id = options.id || `uwsfmt-converter-${Date.now()}-${counter++}`;
      widget.title.label = options.action === 'add' ? `Add to ${options.output}` : 'Convert to UWS';
      widget.title.icon = uwsIcon;
      widget.title.closable = true;
      shell.add(widget, 'main');
      void converters.add(widget);
      // remember the job as soon as it starts, so that a reload reattaches
      content.model.on('change:job', () => void converters.save(widget));
      content.model.on('change:output', () => void converters.save(widget));
      return widget;
    }
    if (restorer) {
      void restorer.restore(converters, {
        command: CommandIDs.convert,
        args: w => ({ ...w.content.state, id: w.id, restoring: true }),
        name: w => w.id
      });
    }

    // ---------------------------------------------------------------- commands
    commands.addCommand(CommandIDs.open, {
      label: args => (args.path || args.fromPalette ? 'Open UWS Store in Inspector…' : 'Open in UWS Inspector'),
      caption: 'Inspect a UWS store: summary, tensors, spectra, errors, export (no kernel needed)',
      icon: args => (args.fromPalette && !args.fromLauncher ? undefined : uwsIcon),
      execute: async args => {
        const path = (args.path as string) || (isStore(selectedPath()) ? selectedPath() : await askStore('Open a UWS store'));
        return path ? openInspector(path, args.tab as string | undefined) : undefined;
      }
    });
    commands.addCommand(CommandIDs.convert, {
      label: args => (args.fromLauncher ? 'Convert to UWS' : 'Convert to UWS store…'),
      caption: 'Convert checkpoints (safetensors, HF folders, PEFT adapters, torch files) into a UWS store',
      icon: args => (args.fromPalette ? undefined : uwsIcon),
      execute: args => {
        const fromBrowser = !args.fromLauncher && !args.fromPalette && !args.restoring && !args.sources;
        const sources = (args.sources as string[]) || (fromBrowser ? selectedPaths() : []);
        return openConverter({ sources, output: args.output as string | undefined,
          action: (args.action as 'create' | 'add') || 'create', job: (args.job as string) || undefined,
          id: (args.id as string) || undefined });
      }
    });
    commands.addCommand(CommandIDs.add, {
      label: 'Add checkpoints…',
      caption: 'Project new checkpoints onto the store\'s bases and commit them as new models',
      execute: async args => {
        const path = (args.path as string) || (isStore(selectedPath()) ? selectedPath() : await askStore('Add checkpoints to a store'));
        return path ? openConverter({ sources: [], output: path, action: 'add' }) : undefined;
      }
    });
    commands.addCommand(CommandIDs.validate, {
      label: args => (args.fromPalette ? 'Validate a UWS Store…' : 'Validate'),
      caption: 'Check a UWS store against the specification',
      execute: async args => {
        const path = (args.path as string) || (isStore(selectedPath()) ? selectedPath() : await askStore('Validate a UWS store'));
        if (path) {
          await validate(path);
        }
      }
    });
    commands.addCommand(CommandIDs.exportModel, {
      label: args => (args.fromPalette ? 'Export a Model from a UWS Store…' : 'Export model…'),
      caption: 'Open the store\'s models to export one (safetensors, and PEFT/kohya for LoRA stores)',
      execute: async args => {
        const path = (args.path as string) || (isStore(selectedPath()) ? selectedPath() : await askStore('Export a model'));
        return path ? openInspector(path, 'models') : undefined;
      }
    });

    // ---------------------------------------------------------------- file browser
    // (a context-menu selector cannot hold a list: one item per selector)
    const item = (type: string) => `.jp-DirListing-item[data-file-type="${type}"]`;
    const menu: [string, string[], number][] = [
      [CommandIDs.open, [item('uws-store'), item('uws-zip')], 1],
      [CommandIDs.add, [item('uws-store')], 2],
      [CommandIDs.validate, [item('uws-store'), item('uws-zip')], 3],
      [CommandIDs.exportModel, [item('uws-store'), item('uws-zip')], 4],
      [CommandIDs.convert, [item('uws-safetensors'), item('uws-torch'),
        '.jp-DirListing-item[data-isdir="true"]:not([data-file-type="uws-store"])'], 5]
    ];
    for (const [command, selectors, rank] of menu) {
      for (const selector of selectors) {
        app.contextMenu.addItem({ command, selector, rank });
      }
    }

    // A folder's double-click navigates into it: for a *.uws folder, open the inspector instead.
    browser.node.addEventListener('dblclick', (event: MouseEvent) => {
      const row = (event.target as HTMLElement).closest('.jp-DirListing-item');
      if (!row || row.getAttribute('data-file-type') !== 'uws-store' || event.button !== 0
        || event.ctrlKey || event.shiftKey || event.altKey || event.metaKey
        || (event.target as HTMLElement).closest('.jp-DirListing-checkboxWrapper')) {
        return;
      }
      const name = row.querySelector('.jp-DirListing-itemText')?.textContent?.trim();
      const item = Array.from(browser.selectedItems()).find(i => i.name === name);
      if (!item) {
        return;
      }
      event.preventDefault();
      event.stopPropagation();
      void openInspector(item.path);
    }, true);

    // ---------------------------------------------------------------- palette + launcher
    if (palette) {
      for (const command of [CommandIDs.open, CommandIDs.convert, CommandIDs.add, CommandIDs.validate, CommandIDs.exportModel]) {
        palette.addItem({ command, category: 'UWS stores', args: { fromPalette: true } });
      }
    }
    if (launcher) {
      launcher.add({ command: CommandIDs.convert, category: 'UWS', rank: 1, args: { fromLauncher: true } });
      launcher.add({ command: CommandIDs.open, category: 'UWS', rank: 2, args: { fromPalette: true, fromLauncher: true } });
    }
  }
};

export default plugin;
