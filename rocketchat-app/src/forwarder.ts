// The path of one message event (hook -> CloudEvent -> signed POST -> outbox on failure) and the
// scheduled job that empties the outbox.
import type { IHttp, ILogger, IPersistence, IRead } from '@rocket.chat/apps-engine/definition/accessors';
import type { IMessage } from '@rocket.chat/apps-engine/definition/messages';
import type { IJobContext, IProcessor } from '@rocket.chat/apps-engine/definition/scheduler';
import { StartupType } from '@rocket.chat/apps-engine/definition/scheduler';

import { EventKind, InvalidMessageError, toCloudEvent } from './cloudevent';
import { HANDLER_RETRY, Outcome, postOnce, postWithRetry, RetryPolicy } from './delivery';
import { park, pending, unpark } from './outbox';
import { BridgeSettings, readSettings, readSiteUrl } from './settings';

export const RESEND_JOB_ID = 'rc-worker-outbox-resend';
export const RESEND_INTERVAL = '30 seconds';
// The Apps-Engine gives one call into an app 30 s by default (APPS_ENGINE_RUNTIME_TIMEOUT). A hook
// makes up to 3 tries, so one try gets at most 6 s (3 x 6 s + 0.75 s of backoff < 30 s), and the
// job starts no new POST after 20 s of its run.
export const MAX_TRY_TIMEOUT_MS = 6000;
export const RESEND_BUDGET_MS = 20000;

export type ForwardResult = Outcome | 'parked' | 'disabled' | 'unconfigured' | 'invalid';

/** Whether the hook for this kind should run at all (the check* methods). */
export async function isEnabled(kind: EventKind, read: IRead): Promise<boolean> {
    return (await readSettings(read)).enabled.has(kind);
}

/**
 * Forwards one message event: delivered, rejected (logged and dropped) or parked for the job.
 *
 * A new event is sent even while older ones wait in the outbox: checking the outbox would read
 * every parked record on every message, just when the outbox is large, and events parked behind
 * it would only drain as fast as the job runs. So after an outage new events may reach the
 * ingest before older parked ones; each keeps its own id and the worker deduplicates by it.
 */
export async function forward(
    kind: EventKind,
    message: IMessage,
    read: IRead,
    http: IHttp,
    persistence: IPersistence,
    logger: ILogger,
    policy: RetryPolicy = HANDLER_RETRY,
): Promise<ForwardResult> {
    const settings = await readSettings(read);
    if (!settings.enabled.has(kind)) {
        return 'disabled';
    }
    if (!isConfigured(settings, logger)) {
        return 'unconfigured';
    }
    let event;
    try {
        event = toCloudEvent(kind, message, await readSiteUrl(read));
    } catch (error) {
        if (error instanceof InvalidMessageError) {
            logger.error('event_invalid', { kind, error: error.message });
            return 'invalid';
        }
        throw error;
    }
    const body = JSON.stringify(event);
    const outcome = await postWithRetry(http, bounded(settings), event.id, body, logger, policy);
    if (outcome === 'failed') {
        await park(persistence, read.getPersistenceReader(), { id: event.id, type: event.type, body }, logger);
        return 'parked';
    }
    return outcome;
}

/** What one run of the resend job did. */
export interface ResendReport {
    delivered: number;
    rejected: number;
    left: number;
}

/**
 * Sends parked events oldest first and removes each after a 2xx (or a permanent 4xx, logged).
 * The run stops at the first event that fails again, so no parked event overtakes an older one,
 * and once its time budget is used; the next run goes on from there.
 */
export async function resendParked(
    read: IRead,
    http: IHttp,
    persistence: IPersistence,
    logger: ILogger,
    clock: () => number = Date.now,
): Promise<ResendReport> {
    const started = clock();
    const parked = await pending(read.getPersistenceReader());
    const report: ResendReport = { delivered: 0, rejected: 0, left: parked.length };
    if (parked.length === 0) {
        return report;
    }
    const settings = await readSettings(read);
    if (!isConfigured(settings, logger)) {
        return report;
    }
    for (const event of parked) {
        if (clock() - started >= RESEND_BUDGET_MS) {
            break;
        }
        const outcome = await postOnce(http, bounded(settings), event.eventId, event.body, logger);
        if (outcome === 'failed') {
            break;
        }
        await unpark(persistence, event.eventId);
        report[outcome === 'delivered' ? 'delivered' : 'rejected'] += 1;
        report.left -= 1;
    }
    logger.info('outbox_resend_run', report);
    return report;
}

/** The recurring job, registered in extendConfiguration and started with the app. */
export function resendProcessor(logger: () => ILogger): IProcessor {
    return {
        id: RESEND_JOB_ID,
        startupSetting: { type: StartupType.RECURRING, interval: RESEND_INTERVAL },
        processor: async (_context: IJobContext, read, _modify, http, persistence) => {
            await resendParked(read, http, persistence, logger());
        },
    };
}

function bounded(settings: BridgeSettings): BridgeSettings {
    return { ...settings, timeoutMs: Math.min(settings.timeoutMs, MAX_TRY_TIMEOUT_MS) };
}

// Without a URL or a secret there is nowhere to send and nothing to sign with; the events of an
// app that was never configured are not kept (the setting is required, and the log says so).
function isConfigured(settings: BridgeSettings, logger: ILogger): boolean {
    const missing = [!settings.eventsUrl && 'ingest_url', !settings.secret && 'shared_secret'].filter(Boolean);
    if (missing.length > 0) {
        logger.error('bridge_not_configured', { missing, fix: 'set them in Administration > Apps > rc-apps-worker bridge > Settings' });
        return false;
    }
    return true;
}
