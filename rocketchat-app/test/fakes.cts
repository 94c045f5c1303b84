// Small stand-ins for the accessors Rocket.Chat hands an app: only what the bridge calls, recorded
// so tests can look at what was sent, stored and logged.
import type {
    IHttp,
    IHttpRequest,
    IHttpResponse,
    ILogger,
    IPersistence,
    IPersistenceRead,
    IRead,
} from '@rocket.chat/apps-engine/definition/accessors';
import { RequestMethod } from '@rocket.chat/apps-engine/definition/accessors';
import { RocketChatAssociationRecord } from '@rocket.chat/apps-engine/definition/metadata';

/** One scripted answer: a status code, or 'network' for a request that throws. */
export type Reply = number | 'network';

export interface SentRequest {
    url: string;
    content: string;
    headers: { [key: string]: string };
    timeout?: number;
}

/** Answers POSTs from a script (the last reply repeats) and records each request. */
export class FakeHttp {
    public readonly requests: SentRequest[] = [];

    constructor(private replies: Reply[], private readonly body: string = '') {}

    public script(replies: Reply[]): void {
        this.replies = replies;
    }

    public async post(url: string, options?: IHttpRequest): Promise<IHttpResponse> {
        this.requests.push({ url, content: options?.content ?? '', headers: { ...(options?.headers ?? {}) }, timeout: options?.timeout });
        const reply = this.replies.length > 1 ? this.replies.shift()! : this.replies[0];
        if (reply === 'network') {
            throw new Error('connect ECONNREFUSED 127.0.0.1:8088');
        }
        return { url, method: RequestMethod.POST, statusCode: reply, content: this.body };
    }

    public asHttp(): IHttp {
        const unused = (): never => {
            throw new Error('the bridge only POSTs');
        };
        return { post: this.post.bind(this), get: unused, put: unused, del: unused, patch: unused };
    }
}

interface StoredRecord {
    id: string;
    data: object;
    associations: string[];
}

function key(association: RocketChatAssociationRecord): string {
    return `${association.getModel()}:${association.getID()}`;
}

/**
 * The app's persistence in memory, with the semantics of Rocket.Chat's persistence bridge
 * (apps/meteor/app/apps/server/bridges/persistence.ts): a read matches records holding all the
 * given associations ($all), a remove by associations deletes one of them (deleteOne).
 */
export class FakePersistence {
    public readonly records: StoredRecord[] = [];
    private nextId = 0;

    public asPersistence(): IPersistence {
        const unused = (): never => {
            throw new Error('not used by the bridge');
        };
        return {
            create: unused,
            createWithAssociation: async (data, association) => this.insert(data, [association]),
            createWithAssociations: async (data, associations) => this.insert(data, associations),
            update: unused,
            updateByAssociation: unused,
            updateByAssociations: unused,
            remove: unused,
            removeByAssociation: async (association) => this.removeOne([association]),
            removeByAssociations: async (associations) => this.removeOne(associations),
        };
    }

    public asReader(): IPersistenceRead {
        return {
            read: async (id) => this.records.find((record) => record.id === id)?.data as object,
            readByAssociation: async (association) => this.matching([association]).map((record) => structuredClone(record.data)),
            readByAssociations: async (associations) => this.matching(associations).map((record) => structuredClone(record.data)),
        };
    }

    private insert(data: object, associations: RocketChatAssociationRecord[]): string {
        const id = `rec-${++this.nextId}`;
        this.records.push({ id, data: structuredClone(data), associations: associations.map(key) });
        return id;
    }

    private matching(associations: RocketChatAssociationRecord[]): StoredRecord[] {
        const wanted = associations.map(key);
        return this.records.filter((record) => wanted.every((item) => record.associations.includes(item)));
    }

    private removeOne(associations: RocketChatAssociationRecord[]): object[] {
        const found = this.matching(associations);
        if (found.length > 0) {
            this.records.splice(this.records.indexOf(found[0]), 1);
        }
        return found.map((record) => record.data);
    }
}

export const SECRET = 'test-secret';
export const SITE_URL = 'https://chat.example.com';

export const DEFAULT_APP_SETTINGS: { [id: string]: unknown } = {
    ingest_url: 'http://127.0.0.1:8088/',
    shared_secret: SECRET,
    request_timeout_ms: 1500,
    enabled_events: ['sent', 'updated', 'deleted'],
};

/** IRead over the app's settings, the server's settings and a FakePersistence. */
export function fakeRead(
    persistence: FakePersistence,
    appSettings: { [id: string]: unknown } = DEFAULT_APP_SETTINGS,
    serverSettings: { [id: string]: unknown } = { Site_Url: SITE_URL },
): IRead {
    const settings = {
        getById: async (id: string) => ({ id, value: appSettings[id] }),
        getValueById: async (id: string) => appSettings[id],
    };
    const server = {
        getOneById: async (id: string) => ({ id, value: serverSettings[id] }),
        getValueById: async (id: string) => serverSettings[id],
        getAll: async () => [][Symbol.iterator](),
        isReadableById: async (id: string) => id in serverSettings,
    };
    const environment = {
        getSettings: () => settings,
        getServerSettings: () => server,
        getEnvironmentVariables: () => ({ getValueByName: async () => '', isReadable: async () => false, isSet: async () => false }),
    };
    return { getEnvironmentReader: () => environment, getPersistenceReader: () => persistence.asReader() } as unknown as IRead;
}

/** Records every logged item, so tests can look for a secret in all of them. */
export class FakeLogger {
    public readonly entries: Array<{ level: string; items: unknown[] }> = [];

    public asLogger(): ILogger {
        const record =
            (level: string) =>
            (...items: unknown[]): void => {
                this.entries.push({ level, items });
            };
        return {
            method: 'executePostMessageSent',
            debug: record('debug'),
            info: record('info'),
            log: record('log'),
            warn: record('warn'),
            error: record('error'),
            success: record('success'),
            getEntries: () => [],
            getMethod: () => 'executePostMessageSent',
            getStartTime: () => new Date(0),
            getEndTime: () => new Date(0),
            getTotalTime: () => 0,
        };
    }

    public events(level?: string): string[] {
        return this.entries.filter((entry) => !level || entry.level === level).map((entry) => String(entry.items[0]));
    }

    public text(): string {
        return JSON.stringify(this.entries);
    }
}

/** A retry policy that records the delays instead of waiting them out. */
export function noWaitPolicy(attempts = 3): { attempts: number; baseDelayMs: number; maxDelayMs: number; sleep(ms: number): Promise<void>; slept: number[] } {
    const slept: number[] = [];
    return {
        attempts,
        baseDelayMs: 250,
        maxDelayMs: 2000,
        slept,
        sleep: async (ms: number) => {
            slept.push(ms);
        },
    };
}
