import * as assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { describe, it } from 'node:test';

import type { EventKind } from '../src/cloudevent';
import { forward } from '../src/forwarder';
import { pending } from '../src/outbox';
import { DEFAULT_APP_SETTINGS, FakeHttp, FakeLogger, FakePersistence, fakeRead, noWaitPolicy, Reply, SECRET } from './fakes.cjs';
import { editedMessage, sentMessage } from './messages.cjs';

function setup(replies: Reply[], appSettings = DEFAULT_APP_SETTINGS, body = '') {
    const http = new FakeHttp(replies, body);
    const store = new FakePersistence();
    const logger = new FakeLogger();
    const policy = noWaitPolicy();
    const run = (kind: EventKind = 'sent', message = sentMessage()) =>
        forward(kind, message, fakeRead(store, appSettings), http.asHttp(), store.asPersistence(), logger.asLogger(), policy);
    return { http, store, logger, policy, run };
}

describe('forward on success', () => {
    it('POSTs the signed CloudEvent once to <ingest_url>/v1/events', async () => {
        /** One request: content type, timeout from the settings, body = the event. */
        const { http, store, run } = setup([202]);
        assert.equal(await run(), 'delivered');
        assert.equal(http.requests.length, 1);
        const [request] = http.requests;
        assert.equal(request.url, 'http://127.0.0.1:8088/v1/events');
        assert.equal(request.headers['Content-Type'], 'application/cloudevents+json');
        assert.equal(request.timeout, 1500);
        const event = JSON.parse(request.content);
        assert.equal(event.id, 'msg-0001');
        assert.equal(event.source, 'https://chat.example.com');
        assert.equal(store.records.length, 0);
    });

    it('signs exactly the bytes it sends', async () => {
        /** X-Signature checked against an HMAC computed here, with node's crypto, over the sent body. */
        const { http, run } = setup([202]);
        await run('updated', editedMessage());
        const [request] = http.requests;
        const expected = createHmac('sha256', SECRET).update(Buffer.from(request.content, 'utf8')).digest('hex');
        assert.equal(request.headers['X-Signature'], `sha256=${expected}`);
    });
});

describe('forward on failures worth retrying', () => {
    for (const [name, reply] of [
        ['503', 503],
        ['a network error', 'network'],
        ['429', 429],
        ['408', 408],
    ] as Array<[string, Reply]>) {
        it(`retries ${name} with exponential backoff, then parks the event`, async () => {
            /** Three tries, delays doubling, then one outbox record holding the exact body. */
            const { http, store, policy, run } = setup([reply]);
            assert.equal(await run(), 'parked');
            assert.equal(http.requests.length, 3);
            assert.deepEqual(policy.slept, [250, 500]);
            const parked = await pending(store.asReader());
            assert.equal(parked.length, 1);
            assert.equal(parked[0].eventId, 'msg-0001');
            assert.equal(parked[0].body, http.requests[0].content);
        });
    }

    it('stops retrying as soon as a try succeeds', async () => {
        /** 503 then 202: two requests, nothing parked. */
        const { http, store, run } = setup([503, 202]);
        assert.equal(await run(), 'delivered');
        assert.equal(http.requests.length, 2);
        assert.equal(store.records.length, 0);
    });

    it('parks the same event only once', async () => {
        /** The hook firing twice for one message while ingest is down leaves one record. */
        const { store, run } = setup([503]);
        await run();
        await run();
        assert.equal((await pending(store.asReader())).length, 1);
        assert.equal(store.records.length, 1);
    });

    it('sends a new event directly while older ones wait in the outbox', async () => {
        /** Once ingest is back, new events go out at once; the job sends the parked ones. */
        const { http, store, run } = setup([503]);
        await run('sent');
        http.script([202]);
        assert.equal(await run('updated', editedMessage()), 'delivered');
        assert.equal(http.requests.length, 4);
        assert.deepEqual(
            (await pending(store.asReader())).map((event) => event.eventId),
            ['msg-0001'],
        );
    });
});

describe('forward on permanent refusals', () => {
    for (const status of [400, 401, 403, 413]) {
        it(`neither retries nor parks on ${status}`, async () => {
            /** A 4xx other than 408/429 cannot succeed later: logged with the reason, dropped. */
            const { http, store, logger, run } = setup([status], DEFAULT_APP_SETTINGS, 'invalid event: data.room.id missing');
            assert.equal(await run(), 'rejected');
            assert.equal(http.requests.length, 1);
            assert.equal(store.records.length, 0);
            assert.deepEqual(logger.events('error'), ['event_rejected']);
            assert.match(logger.text(), /data\.room\.id missing/);
        });
    }
});

describe('forward and the settings', () => {
    it('sends nothing for an event kind that is not enabled', async () => {
        /** enabled_events without "deleted": the delete hook does nothing. */
        const { http, run } = setup([202], { ...DEFAULT_APP_SETTINGS, enabled_events: ['sent', 'updated'] });
        assert.equal(await run('deleted'), 'disabled');
        assert.equal(await run('sent'), 'delivered');
        assert.equal(http.requests.length, 1);
    });

    it('sends nothing and says which settings are missing when unconfigured', async () => {
        /** No URL and no secret: an error naming both, no request, no record. */
        const { http, store, logger, run } = setup([202], { enabled_events: ['sent'] });
        assert.equal(await run(), 'unconfigured');
        assert.equal(http.requests.length, 0);
        assert.equal(store.records.length, 0);
        assert.deepEqual((logger.entries[0].items[1] as { missing: string[] }).missing, ['ingest_url', 'shared_secret']);
    });

    it('logs and drops a message without an id', async () => {
        /** Nothing to identify the event by: no request, no record, an error in the log. */
        const { http, store, logger, run } = setup([202]);
        assert.equal(await run('sent', sentMessage({ id: undefined })), 'invalid');
        assert.equal(http.requests.length, 0);
        assert.equal(store.records.length, 0);
        assert.deepEqual(logger.events('error'), ['event_invalid']);
    });

    it('never writes the shared secret to the log', async () => {
        /** Every path that logs (failure, parking, refusal) is taken; the secret appears in none. */
        const { logger, run } = setup([503, 'network', 503, 401]);
        await run('sent');
        const refused = setup([401]);
        await refused.run('deleted');
        assert.ok(logger.entries.length > 0 && refused.logger.entries.length > 0);
        assert.equal(logger.text().includes(SECRET), false);
        assert.equal(refused.logger.text().includes(SECRET), false);
    });
});
