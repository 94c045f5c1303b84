import * as assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, it } from 'node:test';

import { FIXTURE_DIR, FIXTURE_SECRET, MANIFEST, manifest, render } from './interop.cjs';

describe('the interop fixtures in test/fixtures', () => {
    it('hold exactly the bodies the app produces now', () => {
        /** A change to the event shape must come with `npm run fixtures` and a look at the Python side. */
        const rendered = render();
        for (const fixture of rendered) {
            assert.equal(fs.readFileSync(path.join(FIXTURE_DIR, fixture.file), 'utf8'), fixture.body, fixture.file);
        }
        assert.equal(fs.readFileSync(path.join(FIXTURE_DIR, MANIFEST), 'utf8'), manifest(rendered));
    });

    it('carry signatures that an independent HMAC over the file bytes confirms', () => {
        /** What the ingest will do: HMAC-SHA256 of the raw bytes under the shared secret. */
        const doc = JSON.parse(fs.readFileSync(path.join(FIXTURE_DIR, MANIFEST), 'utf8'));
        assert.equal(doc.secret, FIXTURE_SECRET);
        assert.equal(doc.events.length, 4);
        for (const event of doc.events) {
            const bytes = fs.readFileSync(path.join(FIXTURE_DIR, event.file));
            assert.equal(event.signature, `sha256=${createHmac('sha256', FIXTURE_SECRET).update(bytes).digest('hex')}`, event.file);
            assert.equal(JSON.parse(bytes.toString('utf8')).id, event.id);
        }
    });
});
