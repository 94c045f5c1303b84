import * as assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { describe, it } from 'node:test';

import { sign } from '../src/signature';

describe('sign', () => {
    it('matches the RFC 4231 HMAC-SHA256 test vector', () => {
        /** Test case 2 of RFC 4231: key "Jefe". */
        assert.equal(sign('what do ya want for nothing?', 'Jefe'), 'sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843');
    });

    it('signs the UTF-8 bytes of a body with non-ASCII text', () => {
        /** The server hashes the bytes it receives; the app must hash the same bytes. */
        const body = JSON.stringify({ text: 'Grüße 👋 ünïcödé' });
        const expected = createHmac('sha256', Buffer.from('test-secret', 'utf8')).update(Buffer.from(body, 'utf8')).digest('hex');
        assert.equal(sign(body, 'test-secret'), `sha256=${expected}`);
    });

    it('writes lowercase hex', () => {
        /** The header format the ingest compares against. */
        assert.match(sign('{}', 'k'), /^sha256=[0-9a-f]{64}$/);
    });
});
