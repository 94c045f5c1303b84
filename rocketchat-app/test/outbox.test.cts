import * as assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { describe, it } from 'node:test';

import { forward, MAX_TRY_TIMEOUT_MS, RESEND_BUDGET_MS, resendParked } from '../src/forwarder';
import { pending } from '../src/outbox';
import { DEFAULT_APP_SETTINGS, FakeHttp, FakeLogger, FakePersistence, fakeRead, noWaitPolicy, SECRET } from './fakes.cjs';
import { sentMessage } from './messages.cjs';

/** Parks messages msg-1..msg-n through the hook while ingest answers 503. */
async function parkMessages(n: number) {
    const http = new FakeHttp([503]);
    const store = new FakePersistence();
    const logger = new FakeLogger();
    for (let i = 1; i <= n; i++) {
        const message = sentMessage({ id: `msg-${i}` });
        await forward('sent', message, fakeRead(store), http.asHttp(), store.asPersistence(), logger.asLogger(), noWaitPolicy());
    }
    http.requests.length = 0;
    const resend = (settings = DEFAULT_APP_SETTINGS, clock?: () => number) =>
        resendParked(fakeRead(store, settings), http.asHttp(), store.asPersistence(), logger.asLogger(), clock);
    return { http, store, logger, resend };
}

const sentIds = (http: FakeHttp) => http.requests.map((request) => JSON.parse(request.content).id);
const parkedIds = async (store: FakePersistence) => (await pending(store.asReader())).map((event) => event.eventId);

describe('the resend job', () => {
    it('resends parked events oldest first and removes each after a 2xx', async () => {
        /** Three parked, ingest back: three POSTs in parking order, outbox empty. */
        const { http, store, resend } = await parkMessages(3);
        http.script([202]);
        assert.deepEqual(await resend(), { delivered: 3, rejected: 0, left: 0 });
        assert.deepEqual(sentIds(http), ['msg-1', 'msg-2', 'msg-3']);
        assert.deepEqual(await parkedIds(store), []);
    });

    it('sends every parked event in one run when the ingest is quick', async () => {
        /** No fixed batch: 250 parked events drain in one run, so the outbox outpaces new traffic. */
        const { http, store, resend } = await parkMessages(250);
        http.script([202]);
        assert.deepEqual(await resend(), { delivered: 250, rejected: 0, left: 0 });
        assert.deepEqual(sentIds(http).slice(0, 3), ['msg-1', 'msg-2', 'msg-3']);
        assert.equal(sentIds(http)[249], 'msg-250');
        assert.deepEqual(await parkedIds(store), []);
    });

    it('keeps an event until a 2xx and stops the run at the first failure', async () => {
        /** 202 then 503: msg-1 removed, msg-2 kept, msg-3 not tried (it must not overtake msg-2). */
        const { http, store, resend } = await parkMessages(3);
        http.script([202, 503]);
        assert.deepEqual(await resend(), { delivered: 1, rejected: 0, left: 2 });
        assert.deepEqual(sentIds(http), ['msg-1', 'msg-2']);
        assert.deepEqual(await parkedIds(store), ['msg-2', 'msg-3']);

        http.requests.length = 0;
        http.script([202]);
        await resend();
        assert.deepEqual(sentIds(http), ['msg-2', 'msg-3']);
        assert.deepEqual(await parkedIds(store), []);
    });

    it('keeps every event while the ingest stays unreachable', async () => {
        /** A network error on the first: one try per run, nothing removed. */
        const { http, store, resend } = await parkMessages(2);
        http.script(['network']);
        assert.deepEqual(await resend(), { delivered: 0, rejected: 0, left: 2 });
        assert.equal(http.requests.length, 1);
        assert.deepEqual(await parkedIds(store), ['msg-1', 'msg-2']);
    });

    it('drops an event the ingest refuses for good and goes on', async () => {
        /** 400 for msg-1 (logged), 202 for msg-2: both leave the outbox. */
        const { http, store, logger, resend } = await parkMessages(2);
        http.script([400, 202]);
        assert.deepEqual(await resend(), { delivered: 1, rejected: 1, left: 0 });
        assert.deepEqual(await parkedIds(store), []);
        assert.ok(logger.events('error').includes('event_rejected'));
    });

    it('signs a parked body again with the secret in force when it is resent', async () => {
        /** A rotated secret applies to what waited in the outbox. */
        const { http, resend } = await parkMessages(1);
        http.script([202]);
        await resend({ ...DEFAULT_APP_SETTINGS, shared_secret: 'rotated' });
        const [request] = http.requests;
        assert.equal(request.headers['X-Signature'], `sha256=${createHmac('sha256', 'rotated').update(request.content).digest('hex')}`);
        assert.notEqual(request.headers['X-Signature'], `sha256=${createHmac('sha256', SECRET).update(request.content).digest('hex')}`);
    });

    it('starts no new POST once the run has used its time budget', async () => {
        /** The clock passes 20 s after the first POST: one sent, the rest wait for the next run. */
        const { http, store, resend } = await parkMessages(3);
        http.script([202]);
        const clock = () => 1_000_000 + (http.requests.length > 0 ? RESEND_BUDGET_MS : 0);
        assert.deepEqual(await resend(DEFAULT_APP_SETTINGS, clock), { delivered: 1, rejected: 0, left: 2 });
        assert.deepEqual(await parkedIds(store), ['msg-2', 'msg-3']);
    });

    it('caps the timeout of one POST so a run fits the engine call timeout', async () => {
        /** request_timeout_ms of 60 s is sent as 6 s. */
        const { http, resend } = await parkMessages(1);
        http.script([202]);
        await resend({ ...DEFAULT_APP_SETTINGS, request_timeout_ms: 60000 });
        assert.equal(http.requests[0].timeout, MAX_TRY_TIMEOUT_MS);
    });

    it('sends nothing when nothing is parked', async () => {
        /** The 30-second run on an empty outbox makes no request. */
        const { http, resend } = await parkMessages(0);
        assert.deepEqual(await resend(), { delivered: 0, rejected: 0, left: 0 });
        assert.equal(http.requests.length, 0);
    });
});
