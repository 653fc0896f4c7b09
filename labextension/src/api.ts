// Calls to the uwsfmt server extension (jupyter_ext/server): the server's auth and XSRF token
// come with ServerConnection; a refusal comes back as an Error carrying the server's message.
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export async function api<T = any>(
  route: string,
  init: RequestInit = {},
  query?: Record<string, string>
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  let url = URLExt.join(settings.baseUrl, 'uwsfmt', route);
  if (query) {
    url += URLExt.objectToQueryString(query);
  }
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new Error(`The server cannot be reached: ${error}`);
  }
  const text = await response.text();
  let data: any = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { message: text };
  }
  if (!response.ok) {
    const message = (data && data.message) || `${response.status} ${response.statusText}`;
    throw new Error(response.status === 404 && !data?.message
      ? 'The uwsfmt server extension is not enabled (jupyter server extension enable jupyter_ext)' : message);
  }
  return data as T;
}

export function post<T = any>(route: string, body: unknown): Promise<T> {
  return api<T>(route, { method: 'POST', body: JSON.stringify(body) });
}
