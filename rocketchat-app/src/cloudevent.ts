// One message event becomes one structured-mode CloudEvent 1.0. Pure: the same inputs give the
// same bytes, which is what the signature and the worker's deduplication (source + id) rely on.
import type { IMessage } from '@rocket.chat/apps-engine/definition/messages';

export type EventKind = 'sent' | 'updated' | 'deleted';

export const EVENT_KINDS: ReadonlyArray<EventKind> = ['sent', 'updated', 'deleted'];

export const EVENT_TYPES: Readonly<Record<EventKind, string>> = {
    sent: 'chat.rocket.message.sent',
    updated: 'chat.rocket.message.updated',
    deleted: 'chat.rocket.message.deleted',
};

export type Json = string | number | boolean | null | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

export interface CloudEvent {
    specversion: '1.0';
    type: string;
    source: string;
    id: string;
    time: string;
    datacontenttype: 'application/json';
    data: JsonObject;
}

/** Raised when a message cannot be turned into an event (it has no id): it is logged and dropped. */
export class InvalidMessageError extends Error {}

/**
 * Builds the CloudEvent for one message event.
 *
 * The id of a `sent` event is the message id, so a message re-sent by anyone is deduplicated by the
 * worker; an edit is `<messageId>:updated:<editedAt or updatedAt in epoch ms>` (each edit is its own
 * event, the same edit twice is one); a delete is `<messageId>:deleted`.
 *
 * @param kind which hook fired
 * @param message the message as the Apps-Engine hands it to the hook
 * @param siteUrl the server's Site_Url setting, the event's `source`
 * @param now the time used where the message carries none (the delete, an edit without a date)
 */
export function toCloudEvent(kind: EventKind, message: IMessage, siteUrl: string, now: Date = new Date()): CloudEvent {
    if (!message.id) {
        throw new InvalidMessageError(`message without an id in a ${kind} event: nothing to identify it by`);
    }
    const { id, time } = identify(kind, message, now);
    return {
        specversion: '1.0',
        type: EVENT_TYPES[kind],
        source: siteUrl,
        id,
        time,
        datacontenttype: 'application/json',
        data: messageData(message),
    };
}

function identify(kind: EventKind, message: IMessage, now: Date): { id: string; time: string } {
    const messageId = message.id as string;
    if (kind === 'sent') {
        return { id: messageId, time: isoOf(message.createdAt) ?? now.toISOString() };
    }
    if (kind === 'updated') {
        const at = toDate(message.editedAt) ?? toDate(message.updatedAt) ?? now;
        return { id: `${messageId}:updated:${at.getTime()}`, time: at.toISOString() };
    }
    return { id: `${messageId}:deleted`, time: now.toISOString() };
}

/** The IMessage fields the contract names, under the Apps-Engine's names, absent ones left out. */
export function messageData(message: IMessage): JsonObject {
    const room = message.room;
    const sender = message.sender;
    return compact({
        id: message.id,
        room: room && compact({ id: room.id, slugifiedName: room.slugifiedName, type: room.type, displayName: room.displayName }),
        sender: sender && compact({ id: sender.id, username: sender.username, name: sender.name, type: senderType(sender.type) }),
        text: message.text,
        createdAt: isoOf(message.createdAt),
        updatedAt: isoOf(message.updatedAt),
        editedAt: isoOf(message.editedAt),
        editor: message.editor && compact({ id: message.editor.id, username: message.editor.username }),
        threadId: message.threadId,
        customFields: message.customFields === undefined ? undefined : toJson(message.customFields),
        attachments: message.attachments === undefined ? undefined : toJson(message.attachments),
        blocks: message.blocks === undefined ? undefined : toJson(message.blocks),
    });
}

// The contract knows user, bot and app; the engine's UNKNOWN (or no type at all) says nothing,
// so the field is left out rather than guessed.
function senderType(type: unknown): string | undefined {
    return type === 'user' || type === 'bot' || type === 'app' ? type : undefined;
}

function compact(fields: { [key: string]: Json | undefined }): JsonObject {
    const out: JsonObject = {};
    for (const [key, value] of Object.entries(fields)) {
        if (value !== undefined && value !== null) {
            out[key] = value;
        }
    }
    return out;
}

// Dates reach an app as Date objects in the Node engine and may arrive as strings or numbers over
// the Deno runtime's wire codec: every form becomes an ISO 8601 string.
function toDate(value: unknown): Date | undefined {
    if (value === undefined || value === null || value === '') {
        return undefined;
    }
    const date = isDate(value) ? value : typeof value === 'string' || typeof value === 'number' ? new Date(value) : undefined;
    return date && !Number.isNaN(date.getTime()) ? date : undefined;
}

function isDate(value: unknown): value is Date {
    return Object.prototype.toString.call(value) === '[object Date]';
}

function isoOf(value: unknown): string | undefined {
    return toDate(value)?.toISOString();
}

/** Free JSON (custom fields, attachments, blocks): Dates become ISO strings, undefined members go. */
export function toJson(value: unknown): Json | undefined {
    if (value === undefined || typeof value === 'function' || typeof value === 'symbol') {
        return undefined;
    }
    if (value === null || typeof value === 'string' || typeof value === 'boolean') {
        return value;
    }
    if (typeof value === 'number') {
        return Number.isFinite(value) ? value : null;
    }
    if (isDate(value)) {
        return isoOf(value) ?? null;
    }
    if (Array.isArray(value)) {
        return value.map((item) => toJson(item) ?? null);
    }
    if (typeof value === 'object') {
        const out: JsonObject = {};
        for (const [key, item] of Object.entries(value as object)) {
            const converted = toJson(item);
            if (converted !== undefined) {
                out[key] = converted;
            }
        }
        return out;
    }
    return String(value);
}
