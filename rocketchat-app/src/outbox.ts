// Events that could not be delivered wait here, in the app's own persistence, for the scheduled job.
import type { ILogger, IPersistence, IPersistenceRead } from '@rocket.chat/apps-engine/definition/accessors';
import { RocketChatAssociationModel, RocketChatAssociationRecord } from '@rocket.chat/apps-engine/definition/metadata';

export const OUTBOX_ASSOCIATION = 'rc-worker-outbox';

export interface ParkedEvent {
    eventId: string;
    type: string;
    /** The exact JSON body; it is signed again when sent, with the secret in force then. */
    body: string;
    parkedAt: number;
    /** Breaks ties between events parked in the same millisecond. */
    seq: number;
}

// Every record carries two associations: the shared one lists the outbox, the per-event one finds
// (and so deduplicates, and removes) a single event.
const ALL = new RocketChatAssociationRecord(RocketChatAssociationModel.MISC, OUTBOX_ASSOCIATION);

function eventAssociation(eventId: string): RocketChatAssociationRecord {
    return new RocketChatAssociationRecord(RocketChatAssociationModel.MISC, `${OUTBOX_ASSOCIATION}:${eventId}`);
}

let lastSeq = 0;

/** Parks an event unless it is parked already; returns whether a record was written. */
export async function park(
    persistence: IPersistence,
    reader: IPersistenceRead,
    event: { id: string; type: string; body: string },
    logger: ILogger,
): Promise<boolean> {
    const existing = await reader.readByAssociation(eventAssociation(event.id));
    if (existing.length > 0) {
        logger.debug('event_already_parked', { eventId: event.id });
        return false;
    }
    const record: ParkedEvent = { eventId: event.id, type: event.type, body: event.body, parkedAt: Date.now(), seq: ++lastSeq };
    await persistence.createWithAssociations(record, [ALL, eventAssociation(event.id)]);
    logger.warn('event_parked', { eventId: event.id, type: event.type });
    return true;
}

/** The parked events, oldest first. */
export async function pending(reader: IPersistenceRead): Promise<ParkedEvent[]> {
    const records = (await reader.readByAssociation(ALL)) as Array<Partial<ParkedEvent>>;
    return records.filter(isParkedEvent).sort((a, b) => a.parkedAt - b.parkedAt || a.seq - b.seq);
}

export async function unpark(persistence: IPersistence, eventId: string): Promise<void> {
    await persistence.removeByAssociation(eventAssociation(eventId));
}

function isParkedEvent(record: Partial<ParkedEvent>): record is ParkedEvent {
    return typeof record.eventId === 'string' && typeof record.body === 'string' && typeof record.parkedAt === 'number';
}
