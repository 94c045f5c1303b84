import * as assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { SettingType } from '@rocket.chat/apps-engine/definition/settings';

import { readSettings, readSiteUrl, SETTINGS } from '../src/settings';
import { FakePersistence, fakeRead } from './fakes.cjs';

const read = (settings: { [id: string]: unknown }, server: { [id: string]: unknown } = {}) => fakeRead(new FakePersistence(), settings, server);

describe('the settings the app provides', () => {
    it('declares ingest_url, shared_secret, request_timeout_ms and enabled_events', () => {
        /** Ids and types are what an operator sets; the secret is a password field. */
        const byId = Object.fromEntries(SETTINGS.map((setting) => [setting.id, setting]));
        assert.deepEqual(Object.keys(byId), ['ingest_url', 'shared_secret', 'request_timeout_ms', 'enabled_events']);
        assert.equal(byId.ingest_url.type, SettingType.STRING);
        assert.equal(byId.ingest_url.required, true);
        assert.equal(byId.shared_secret.type, SettingType.PASSWORD);
        assert.equal(byId.request_timeout_ms.type, SettingType.NUMBER);
        assert.equal(byId.enabled_events.type, SettingType.MULTI_SELECT);
        assert.deepEqual(byId.enabled_events.values?.map((value) => value.key), ['sent', 'updated', 'deleted']);
        assert.deepEqual(byId.enabled_events.packageValue, ['sent', 'updated', 'deleted']);
    });
});

describe('readSettings', () => {
    it('reads each value and appends /v1/events to the ingest URL', async () => {
        /** A trailing slash on the URL does not double. */
        const settings = await readSettings(
            read({ ingest_url: 'https://ingest.example.com/base/', shared_secret: 's', request_timeout_ms: 2500, enabled_events: ['updated'] }),
        );
        assert.equal(settings.eventsUrl, 'https://ingest.example.com/base/v1/events');
        assert.equal(settings.secret, 's');
        assert.equal(settings.timeoutMs, 2500);
        assert.deepEqual([...settings.enabled], ['updated']);
    });

    it('falls back to defaults for unset values', async () => {
        /** No URL means unconfigured, 5 s timeout, every event kind on. */
        const settings = await readSettings(read({}));
        assert.equal(settings.eventsUrl, '');
        assert.equal(settings.secret, '');
        assert.equal(settings.timeoutMs, 5000);
        assert.deepEqual([...settings.enabled], ['sent', 'updated', 'deleted']);
    });

    it('accepts enabled_events as a comma-separated string and ignores unknown keys', async () => {
        /** A value typed by hand or set through the REST API. */
        const settings = await readSettings(read({ enabled_events: 'deleted, sent,reacted' }));
        assert.deepEqual([...settings.enabled], ['sent', 'deleted']);
    });

    it('treats a non-positive or non-numeric timeout as unset', async () => {
        /** 0 would mean "no timeout" to some HTTP clients: the default is used instead. */
        assert.equal((await readSettings(read({ request_timeout_ms: 0 }))).timeoutMs, 5000);
        assert.equal((await readSettings(read({ request_timeout_ms: 'soon' }))).timeoutMs, 5000);
        assert.equal((await readSettings(read({ request_timeout_ms: '750' }))).timeoutMs, 750);
    });

    it('reads the source from the server setting Site_Url', async () => {
        /** The event source is the server's own Site URL. */
        assert.equal(await readSiteUrl(read({}, { Site_Url: 'https://open.rocket.chat' })), 'https://open.rocket.chat');
    });
});
