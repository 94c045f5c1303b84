// The interop fixtures: exact bodies and signatures the app produces for a fixed secret, written
// to test/fixtures/ so the Python ingest's tests can prove both ends agree byte for byte.
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { IMessage } from '@rocket.chat/apps-engine/definition/messages';
import { RoomType } from '@rocket.chat/apps-engine/definition/rooms';

import { EventKind, toCloudEvent } from '../src/cloudevent';
import { sign, SIGNATURE_HEADER } from '../src/signature';
import { BRIDGE_BOT, editedMessage, GENERAL, sentMessage } from './messages.cjs';

export const FIXTURE_SECRET = 'test-secret';
export const FIXTURE_SITE_URL = 'https://chat.example.com';
export const FIXTURE_NOW = new Date('2026-11-29T10:10:00.000Z');
/** Compiled to dist/build/test/, the fixtures stay in the source tree. */
export const FIXTURE_DIR = path.resolve(__dirname, '..', '..', '..', 'test', 'fixtures');
export const MANIFEST = 'signatures.json';

interface FixtureCase {
    file: string;
    kind: EventKind;
    message: IMessage;
}

export const CASES: FixtureCase[] = [
    {
        file: 'sent.json',
        kind: 'sent',
        message: sentMessage({
            text: 'hello @bob, the report is attached — Grüße 👋',
            threadId: 'msg-0000',
            customFields: { ticket: 'OPS-17' },
            attachments: [{ title: { value: 'report.pdf', link: '/file-upload/f1/report.pdf' }, description: 'weekly report', type: 'file' }],
        }),
    },
    { file: 'updated.json', kind: 'updated', message: editedMessage() },
    { file: 'deleted.json', kind: 'deleted', message: sentMessage() },
    {
        file: 'sent-by-app.json',
        kind: 'sent',
        message: sentMessage({
            id: 'msg-0002',
            room: { ...GENERAL, id: 'rid-private', slugifiedName: 'ops', displayName: 'ops', type: RoomType.PRIVATE_GROUP },
            sender: BRIDGE_BOT,
            text: 'mention count for @bob: 3',
            threadId: 'msg-0001',
        }),
    },
];

export interface RenderedFixture {
    file: string;
    body: string;
    signature: string;
    type: string;
    id: string;
}

export function render(): RenderedFixture[] {
    return CASES.map(({ file, kind, message }) => {
        const event = toCloudEvent(kind, message, FIXTURE_SITE_URL, FIXTURE_NOW);
        const body = JSON.stringify(event);
        return { file, body, signature: sign(body, FIXTURE_SECRET), type: event.type, id: event.id };
    });
}

export function manifest(rendered: RenderedFixture[]): string {
    const events = rendered.map(({ file, signature, type, id }) => ({ file, signature, type, id }));
    const doc = {
        about: 'Bodies the rc-apps-worker bridge app POSTs to /v1/events, byte for byte (no trailing newline), signed with this secret.',
        secret: FIXTURE_SECRET,
        header: SIGNATURE_HEADER,
        contentType: 'application/cloudevents+json',
        events,
    };
    return `${JSON.stringify(doc, null, 2)}\n`;
}

/** `npm run fixtures`: rewrites test/fixtures/ from the current code. */
export function writeFixtures(): void {
    const rendered = render();
    for (const fixture of rendered) {
        fs.writeFileSync(path.join(FIXTURE_DIR, fixture.file), fixture.body);
    }
    fs.writeFileSync(path.join(FIXTURE_DIR, MANIFEST), manifest(rendered));
}

if (require.main === module) {
    writeFixtures();
}
