import * as assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import type { IConfigurationExtend, IEnvironmentRead, IModify } from '@rocket.chat/apps-engine/definition/accessors';
import { App } from '@rocket.chat/apps-engine/definition/App';
import type { IMessageDeleteContext } from '@rocket.chat/apps-engine/definition/messages';
import type { IAppInfo } from '@rocket.chat/apps-engine/definition/metadata';
import type { IProcessor } from '@rocket.chat/apps-engine/definition/scheduler';
import { StartupType } from '@rocket.chat/apps-engine/definition/scheduler';
import type { ISetting } from '@rocket.chat/apps-engine/definition/settings';

import { RcAppsWorkerBridgeApp } from '../RcAppsWorkerBridgeApp';
import { DEFAULT_APP_SETTINGS, FakeHttp, FakeLogger, FakePersistence, fakeRead } from './fakes.cjs';
import { sentMessage } from './messages.cjs';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const info = require('../../../app.json') as IAppInfo;

function makeApp() {
    const logger = new FakeLogger();
    const app = new RcAppsWorkerBridgeApp(info, logger.asLogger());
    return { app, logger };
}

async function configure(app: RcAppsWorkerBridgeApp) {
    const settings: ISetting[] = [];
    const processors: IProcessor[] = [];
    const configuration = {
        settings: { provideSetting: async (setting: ISetting) => void settings.push(setting) },
        scheduler: { registerProcessors: async (list: IProcessor[]) => void processors.push(...list) },
    } as unknown as IConfigurationExtend;
    await app.initialize(configuration, {} as IEnvironmentRead);
    return { settings, processors };
}

describe('RcAppsWorkerBridgeApp', () => {
    it('is an Apps-Engine App described by app.json', () => {
        /** The engine loads the class named by classFile and checks it extends App. */
        const { app } = makeApp();
        assert.ok(app instanceof App);
        assert.equal(app.getNameSlug(), 'rc-apps-worker-bridge');
        assert.equal(info.classFile, 'RcAppsWorkerBridgeApp.ts');
        assert.deepEqual(info.implements, ['IPostMessageSent', 'IPostMessageUpdated', 'IPostMessageDeleted']);
    });

    it('provides its four settings and a recurring resend job at configuration', async () => {
        /** extendConfiguration registers the settings and the 30-second outbox job. */
        const { settings, processors } = await configure(makeApp().app);
        assert.deepEqual(
            settings.map((setting) => setting.id),
            ['ingest_url', 'shared_secret', 'request_timeout_ms', 'enabled_events'],
        );
        assert.equal(processors.length, 1);
        assert.deepEqual(processors[0].startupSetting, { type: StartupType.RECURRING, interval: '30 seconds' });
    });

    it('forwards each hook as its own event type', async () => {
        /** executePostMessageSent/Updated/Deleted send sent, updated and deleted events. */
        const { app } = makeApp();
        const http = new FakeHttp([202]);
        const store = new FakePersistence();
        const read = fakeRead(store);
        const args = [read, http.asHttp(), store.asPersistence(), {} as IModify] as const;
        await app.executePostMessageSent(sentMessage(), ...args);
        await app.executePostMessageUpdated(sentMessage(), ...args);
        await app.executePostMessageDeleted(sentMessage(), ...args, {} as IMessageDeleteContext);
        assert.deepEqual(
            http.requests.map((request) => JSON.parse(request.content).type),
            ['chat.rocket.message.sent', 'chat.rocket.message.updated', 'chat.rocket.message.deleted'],
        );
    });

    it('checks the enabled events before the engine runs a hook', async () => {
        /** check* answers from enabled_events, so a disabled hook costs no work. */
        const { app } = makeApp();
        const read = fakeRead(new FakePersistence(), { ...DEFAULT_APP_SETTINGS, enabled_events: ['sent'] });
        assert.equal(await app.checkPostMessageSent(sentMessage(), read), true);
        assert.equal(await app.checkPostMessageUpdated(sentMessage(), read), false);
        assert.equal(await app.checkPostMessageDeleted(sentMessage(), read), false);
    });

    it('runs the resend job through the registered processor', async () => {
        /** The processor the engine schedules empties the outbox. */
        const { app } = makeApp();
        const { processors } = await configure(app);
        const store = new FakePersistence();
        const http = new FakeHttp([503]);
        await app.executePostMessageSent(sentMessage(), fakeRead(store), http.asHttp(), store.asPersistence(), {} as IModify);
        assert.equal(store.records.length, 1);
        http.script([202]);
        await processors[0].processor({}, fakeRead(store), {} as IModify, http.asHttp(), store.asPersistence());
        assert.equal(store.records.length, 0);
    });
});
