// The ingest endpoint trusts an event only if its body was signed with the shared secret.
//
// Node's `crypto` is used on purpose: both Apps-Engine runtimes hand it to apps (the Deno runtime
// maps `require('crypto')` to `node:crypto` in its list of allowed native modules, the older Node
// sandbox listed `crypto` among its allowed internal modules), and the packager does not bundle npm
// packages, so a pure-TS HMAC library would not reach the server.
import { createHmac } from 'crypto';

export const SIGNATURE_HEADER = 'X-Signature';
export const CONTENT_TYPE = 'application/cloudevents+json';

/** `sha256=<lowercase hex HMAC-SHA256 of the UTF-8 body under the secret>`. */
export function sign(body: string, secret: string): string {
    return `sha256=${createHmac('sha256', secret).update(body, 'utf8').digest('hex')}`;
}
