// The view modules are plain ES modules shared with the notebook widgets (see build-views.mjs).
declare module './views/inspector.js' {
  export function render(props: { model: any; el: HTMLElement }): void;
}
declare module './views/converter.js' {
  export function render(props: { model: any; el: HTMLElement }): void;
}
