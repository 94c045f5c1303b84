// One POST of a signed event to the ingest endpoint, and the bounded retry around it.
import type { IHttp, ILogger } from '@rocket.chat/apps-engine/definition/accessors';

import { CONTENT_TYPE, sign, SIGNATURE_HEADER } from './signature';

/** delivered: 2xx. rejected: a 4xx that no retry can fix. failed: worth trying again later. */
export type Outcome = 'delivered' | 'rejected' | 'failed';

export interface Target {
    eventsUrl: string;
    secret: string;
    timeoutMs: number;
}

export interface RetryPolicy {
    /** Tries in all, the first included. */
    attempts: number;
    baseDelayMs: number;
    maxDelayMs: number;
    sleep(ms: number): Promise<void>;
}

// Short and bounded: the hook runs inside Rocket.Chat's event dispatch, and what still fails after
// these tries is parked for the scheduled job, so nothing waits long and nothing is lost.
export const HANDLER_RETRY: RetryPolicy = {
    attempts: 3,
    baseDelayMs: 250,
    maxDelayMs: 2000,
    sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
};

// 408 and 429 say "later", not "never"; every other 4xx names a fault in the event or the
// configuration that sending again cannot cure.
const RETRIABLE_4XX = new Set([408, 429]);

export function classify(statusCode: number): Outcome {
    if (statusCode >= 200 && statusCode < 300) {
        return 'delivered';
    }
    if (statusCode >= 400 && statusCode < 500 && !RETRIABLE_4XX.has(statusCode)) {
        return 'rejected';
    }
    return 'failed';
}

export function backoffMs(policy: RetryPolicy, retry: number): number {
    return Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** retry);
}

/** Sends the body once; never throws (a network error is a `failed` outcome). */
export async function postOnce(http: IHttp, target: Target, eventId: string, body: string, logger: ILogger): Promise<Outcome> {
    try {
        const response = await http.post(target.eventsUrl, {
            content: body,
            headers: { 'Content-Type': CONTENT_TYPE, [SIGNATURE_HEADER]: sign(body, target.secret) },
            timeout: target.timeoutMs,
        });
        const outcome = classify(response.statusCode);
        if (outcome === 'rejected') {
            logger.error('event_rejected', { eventId, status: response.statusCode, reason: reasonOf(response.content) });
        } else if (outcome === 'failed') {
            logger.warn('event_post_failed', { eventId, status: response.statusCode });
        }
        return outcome;
    } catch (error) {
        logger.warn('event_post_failed', { eventId, error: errorText(error) });
        return 'failed';
    }
}

/** Sends with up to `policy.attempts` tries and exponential backoff between them. */
export async function postWithRetry(
    http: IHttp,
    target: Target,
    eventId: string,
    body: string,
    logger: ILogger,
    policy: RetryPolicy = HANDLER_RETRY,
): Promise<Outcome> {
    for (let attempt = 0; ; attempt++) {
        const outcome = await postOnce(http, target, eventId, body, logger);
        if (outcome !== 'failed' || attempt + 1 >= policy.attempts) {
            return outcome;
        }
        await policy.sleep(backoffMs(policy, attempt));
    }
}

// A 400 from ingest names the reason in its body; keep it short so a log line stays a line.
function reasonOf(content: unknown): string {
    return typeof content === 'string' ? content.slice(0, 500) : '';
}

function errorText(error: unknown): string {
    return error instanceof Error ? error.message : String(error);
}
