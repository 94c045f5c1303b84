// The app's settings (Administration > Apps > rc-apps-worker bridge) and the one place that reads them.
import type { IRead } from '@rocket.chat/apps-engine/definition/accessors';
import { ISetting, SettingType } from '@rocket.chat/apps-engine/definition/settings';

import { EVENT_KINDS, EventKind } from './cloudevent';

export const SETTING_INGEST_URL = 'ingest_url';
export const SETTING_SHARED_SECRET = 'shared_secret';
export const SETTING_REQUEST_TIMEOUT_MS = 'request_timeout_ms';
export const SETTING_ENABLED_EVENTS = 'enabled_events';

/** The server setting whose value is every event's `source`. */
export const SITE_URL_SETTING = 'Site_Url';

export const DEFAULT_REQUEST_TIMEOUT_MS = 5000;

export const SETTINGS: ReadonlyArray<ISetting> = [
    {
        id: SETTING_INGEST_URL,
        type: SettingType.STRING,
        packageValue: '',
        required: true,
        public: false,
        i18nLabel: 'Ingest URL',
        i18nDescription: 'Base URL of rc-worker ingest, e.g. http://rc-worker-ingest:8088; events go to <this>/v1/events',
    },
    {
        id: SETTING_SHARED_SECRET,
        type: SettingType.PASSWORD,
        packageValue: '',
        required: true,
        public: false,
        i18nLabel: 'Shared secret',
        i18nDescription: 'The ingest section\'s secret: each body is signed with HMAC-SHA256 under it (header X-Signature)',
    },
    {
        id: SETTING_REQUEST_TIMEOUT_MS,
        type: SettingType.NUMBER,
        packageValue: DEFAULT_REQUEST_TIMEOUT_MS,
        required: false,
        public: false,
        i18nLabel: 'Request timeout (ms)',
        i18nDescription: 'How long one POST to the ingest endpoint may take before it counts as failed and is retried (at most 6000)',
    },
    {
        id: SETTING_ENABLED_EVENTS,
        type: SettingType.MULTI_SELECT,
        packageValue: [...EVENT_KINDS],
        values: EVENT_KINDS.map((kind) => ({ key: kind, i18nLabel: `Message ${kind}` })),
        required: false,
        public: false,
        i18nLabel: 'Events to forward',
        i18nDescription: 'Which message events are sent to the ingest endpoint',
    },
];

export interface BridgeSettings {
    /** `<ingest_url>/v1/events`, or '' when the app is not configured yet. */
    eventsUrl: string;
    secret: string;
    timeoutMs: number;
    enabled: ReadonlySet<EventKind>;
}

export async function readSettings(read: IRead): Promise<BridgeSettings> {
    const settings = read.getEnvironmentReader().getSettings();
    const [url, secret, timeout, enabled] = await Promise.all([
        settings.getValueById(SETTING_INGEST_URL),
        settings.getValueById(SETTING_SHARED_SECRET),
        settings.getValueById(SETTING_REQUEST_TIMEOUT_MS),
        settings.getValueById(SETTING_ENABLED_EVENTS),
    ]);
    return {
        eventsUrl: eventsUrl(url),
        secret: typeof secret === 'string' ? secret : '',
        timeoutMs: positiveNumber(timeout) ?? DEFAULT_REQUEST_TIMEOUT_MS,
        enabled: enabledKinds(enabled),
    };
}

export async function readSiteUrl(read: IRead): Promise<string> {
    const value = await read.getEnvironmentReader().getServerSettings().getValueById(SITE_URL_SETTING);
    return typeof value === 'string' ? value : '';
}

function eventsUrl(value: unknown): string {
    const base = typeof value === 'string' ? value.trim().replace(/\/+$/, '') : '';
    return base ? `${base}/v1/events` : '';
}

function positiveNumber(value: unknown): number | undefined {
    const number = typeof value === 'string' ? Number(value) : value;
    return typeof number === 'number' && Number.isFinite(number) && number > 0 ? number : undefined;
}

// A multi-select holds an array of keys; a value typed by hand may be a comma-separated string.
function enabledKinds(value: unknown): ReadonlySet<EventKind> {
    if (value === undefined || value === null) {
        return new Set(EVENT_KINDS);
    }
    const keys = Array.isArray(value) ? value : String(value).split(',');
    const kinds = keys.map((key) => String(key).trim());
    return new Set(EVENT_KINDS.filter((kind) => kinds.includes(kind)));
}
