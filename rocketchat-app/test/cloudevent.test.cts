import * as assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { RoomType } from '@rocket.chat/apps-engine/definition/rooms';
import { UserType } from '@rocket.chat/apps-engine/definition/users';

import { InvalidMessageError, toCloudEvent } from '../src/cloudevent';
import { ALICE, BRIDGE_BOT, editedMessage, GENERAL, sentMessage, user } from './messages.cjs';

const SITE = 'https://chat.example.com';
const NOW = new Date('2026-12-01T08:00:00.000Z');

describe('toCloudEvent for a sent message', () => {
    it('builds the structured CloudEvent with the message id as event id', () => {
        /** The whole envelope and the contract's data fields, Dates as ISO strings. */
        const event = toCloudEvent('sent', sentMessage(), SITE, NOW);
        assert.deepEqual(event, {
            specversion: '1.0',
            type: 'chat.rocket.message.sent',
            source: SITE,
            id: 'msg-0001',
            time: '2026-11-29T10:00:00.000Z',
            datacontenttype: 'application/json',
            data: {
                id: 'msg-0001',
                room: { id: 'GENERAL', slugifiedName: 'general', type: 'c', displayName: 'general' },
                sender: { id: 'u-alice', username: 'alice', name: 'Alice Liddell', type: 'user' },
                text: 'hello @bob',
                createdAt: '2026-11-29T10:00:00.000Z',
                updatedAt: '2026-11-29T10:00:00.120Z',
            },
        });
    });

    it('omits every field the message does not have', () => {
        /** No undefined or null members reach the JSON: absent stays absent. */
        const message = sentMessage({ text: undefined, updatedAt: undefined });
        const data = toCloudEvent('sent', message, SITE, NOW).data;
        assert.deepEqual(Object.keys(data).sort(), ['createdAt', 'id', 'room', 'sender']);
        assert.equal(JSON.stringify(data).includes('null'), false);
    });

    it('carries thread, custom fields, attachments and blocks, with nested dates converted', () => {
        /** Free JSON passes through; an attachment's Date timestamp becomes ISO 8601. */
        const message = sentMessage({
            threadId: 'msg-0000',
            customFields: { ticket: 42, tags: ['a'], nested: { at: new Date('2026-11-29T09:00:00Z') } },
            attachments: [{ title: { value: 'report', link: 'https://x.example/r' }, text: 'see', timestamp: new Date('2026-11-29T09:30:00Z') }],
            blocks: [{ type: 'section', text: { type: 'mrkdwn', text: '*hi*' } }] as never,
        });
        const data = toCloudEvent('sent', message, SITE, NOW).data;
        assert.equal(data.threadId, 'msg-0000');
        assert.deepEqual(data.customFields, { ticket: 42, tags: ['a'], nested: { at: '2026-11-29T09:00:00.000Z' } });
        assert.deepEqual(data.attachments, [
            { title: { value: 'report', link: 'https://x.example/r' }, text: 'see', timestamp: '2026-11-29T09:30:00.000Z' },
        ]);
        assert.deepEqual(data.blocks, [{ type: 'section', text: { type: 'mrkdwn', text: '*hi*' } }]);
    });

    it('maps sender.type from IUser.type and leaves out an unknown type', () => {
        /** user, bot and app pass; UNKNOWN says nothing and is not guessed. */
        const typeOf = (sender = ALICE) => (toCloudEvent('sent', sentMessage({ sender }), SITE, NOW).data.sender as { type?: string }).type;
        assert.equal(typeOf(ALICE), 'user');
        assert.equal(typeOf(BRIDGE_BOT), 'app');
        assert.equal(typeOf(user('u-bot', 'rocket.cat', 'Rocket Cat', UserType.BOT)), 'bot');
        assert.equal(typeOf(user('u-x', 'x', 'X', UserType.UNKNOWN)), undefined);
    });

    it('keeps each room type letter', () => {
        /** c, p, d and l are the Apps-Engine RoomType values. */
        for (const type of [RoomType.CHANNEL, RoomType.PRIVATE_GROUP, RoomType.DIRECT_MESSAGE, RoomType.LIVE_CHAT]) {
            const room = { ...GENERAL, type };
            assert.equal((toCloudEvent('sent', sentMessage({ room }), SITE, NOW).data.room as { type: string }).type, type);
        }
    });

    it('accepts dates that arrive as strings or epoch numbers', () => {
        /** The Deno runtime's codec may hand dates over serialised; they come out the same. */
        const message = sentMessage({ createdAt: '2026-11-29T10:00:00Z' as never, updatedAt: Date.parse('2026-11-29T10:00:00.120Z') as never });
        const data = toCloudEvent('sent', message, SITE, NOW).data;
        assert.equal(data.createdAt, '2026-11-29T10:00:00.000Z');
        assert.equal(data.updatedAt, '2026-11-29T10:00:00.120Z');
    });

    it('refuses a message without an id', () => {
        /** Without an id there is nothing to deduplicate by. */
        assert.throws(() => toCloudEvent('sent', sentMessage({ id: undefined }), SITE, NOW), InvalidMessageError);
    });
});

describe('toCloudEvent for an edit', () => {
    it('identifies the edit by message id and editedAt in epoch ms', () => {
        /** id = <messageId>:updated:<editedAt ms>, time = editedAt, editor and editedAt in data. */
        const event = toCloudEvent('updated', editedMessage(), SITE, NOW);
        assert.equal(event.type, 'chat.rocket.message.updated');
        assert.equal(event.id, `msg-0001:updated:${Date.parse('2026-11-29T10:05:00.250Z')}`);
        assert.equal(event.time, '2026-11-29T10:05:00.250Z');
        assert.equal(event.data.editedAt, '2026-11-29T10:05:00.250Z');
        assert.deepEqual(event.data.editor, { id: 'u-alice', username: 'alice' });
        assert.equal(event.data.text, 'hello @bob, edited');
    });

    it('falls back to updatedAt when the message has no editedAt', () => {
        /** An update that is not a user edit (e.g. an app changed it) still gets a stable id. */
        const message = sentMessage({ updatedAt: new Date('2026-11-29T10:07:00.000Z') });
        assert.equal(toCloudEvent('updated', message, SITE, NOW).id, `msg-0001:updated:${Date.parse('2026-11-29T10:07:00.000Z')}`);
    });

    it('gives the same edit the same id twice and a later edit another', () => {
        /** Deduplication at the worker needs a deterministic id per edit. */
        const first = toCloudEvent('updated', editedMessage(), SITE, NOW);
        const again = toCloudEvent('updated', editedMessage(), SITE, new Date());
        const later = toCloudEvent('updated', { ...editedMessage(), editedAt: new Date('2026-11-29T10:09:00Z') }, SITE, NOW);
        assert.equal(first.id, again.id);
        assert.notEqual(first.id, later.id);
    });
});

describe('toCloudEvent for a delete', () => {
    it('identifies the delete by message id and stamps it with the time it was seen', () => {
        /** id = <messageId>:deleted; the message carries no deletion time, so `now` is used. */
        const event = toCloudEvent('deleted', sentMessage(), SITE, NOW);
        assert.equal(event.type, 'chat.rocket.message.deleted');
        assert.equal(event.id, 'msg-0001:deleted');
        assert.equal(event.time, NOW.toISOString());
        assert.equal(event.data.id, 'msg-0001');
    });
});
