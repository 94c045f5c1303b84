// Forwards every message sent, edited or deleted in Rocket.Chat to rc-worker ingest as a signed
// CloudEvent. Rocket.Chat fires these hooks after the save and does not retry them, so the app
// retries briefly itself and parks what still fails for a recurring job.
import type {
    IAppAccessors,
    IConfigurationExtend,
    IEnvironmentRead,
    IHttp,
    ILogger,
    IModify,
    IPersistence,
    IRead,
} from '@rocket.chat/apps-engine/definition/accessors';
import { App } from '@rocket.chat/apps-engine/definition/App';
import type {
    IMessage,
    IMessageDeleteContext,
    IPostMessageDeleted,
    IPostMessageSent,
    IPostMessageUpdated,
} from '@rocket.chat/apps-engine/definition/messages';
import type { IAppInfo } from '@rocket.chat/apps-engine/definition/metadata';

import { forward, isEnabled, resendProcessor } from './src/forwarder';
import { SETTINGS } from './src/settings';

export class RcAppsWorkerBridgeApp extends App implements IPostMessageSent, IPostMessageUpdated, IPostMessageDeleted {
    constructor(info: IAppInfo, logger: ILogger, accessors?: IAppAccessors) {
        super(info, logger, accessors);
    }

    public async checkPostMessageSent(_message: IMessage, read: IRead): Promise<boolean> {
        return isEnabled('sent', read);
    }

    public async executePostMessageSent(message: IMessage, read: IRead, http: IHttp, persistence: IPersistence, _modify: IModify): Promise<void> {
        await forward('sent', message, read, http, persistence, this.getLogger());
    }

    public async checkPostMessageUpdated(_message: IMessage, read: IRead): Promise<boolean> {
        return isEnabled('updated', read);
    }

    public async executePostMessageUpdated(message: IMessage, read: IRead, http: IHttp, persistence: IPersistence, _modify: IModify): Promise<void> {
        await forward('updated', message, read, http, persistence, this.getLogger());
    }

    public async checkPostMessageDeleted(_message: IMessage, read: IRead): Promise<boolean> {
        return isEnabled('deleted', read);
    }

    public async executePostMessageDeleted(
        message: IMessage,
        read: IRead,
        http: IHttp,
        persistence: IPersistence,
        _modify: IModify,
        _context: IMessageDeleteContext,
    ): Promise<void> {
        await forward('deleted', message, read, http, persistence, this.getLogger());
    }

    protected async extendConfiguration(configuration: IConfigurationExtend, _environmentRead: IEnvironmentRead): Promise<void> {
        await Promise.all(SETTINGS.map((setting) => configuration.settings.provideSetting({ ...setting })));
        await configuration.scheduler.registerProcessors([resendProcessor(() => this.getLogger())]);
    }
}
