// Messages shaped as the Apps-Engine hands them to the hooks (Dates, enums, nested room and user).
import type { IMessage } from '@rocket.chat/apps-engine/definition/messages';
import { RoomType } from '@rocket.chat/apps-engine/definition/rooms';
import type { IRoom } from '@rocket.chat/apps-engine/definition/rooms';
import { UserType } from '@rocket.chat/apps-engine/definition/users';
import type { IUser } from '@rocket.chat/apps-engine/definition/users';

export function user(id: string, username: string, name: string, type: UserType = UserType.USER): IUser {
    return { id, username, name, type, emails: [], isEnabled: true, roles: ['user'], status: 'online', utcOffset: 0 } as unknown as IUser;
}

export const ALICE = user('u-alice', 'alice', 'Alice Liddell');
export const BRIDGE_BOT = user('u-bridge', 'bridge.bot', 'Bridge', UserType.APP);

export const GENERAL = {
    id: 'GENERAL',
    slugifiedName: 'general',
    displayName: 'general',
    type: RoomType.CHANNEL,
    creator: ALICE,
    usernames: [],
} as unknown as IRoom;

export function sentMessage(overrides: Partial<IMessage> = {}): IMessage {
    return {
        id: 'msg-0001',
        room: GENERAL,
        sender: ALICE,
        text: 'hello @bob',
        createdAt: new Date('2026-11-29T10:00:00.000Z'),
        updatedAt: new Date('2026-11-29T10:00:00.120Z'),
        ...overrides,
    };
}

export function editedMessage(): IMessage {
    return sentMessage({
        text: 'hello @bob, edited',
        updatedAt: new Date('2026-11-29T10:05:00.500Z'),
        editedAt: new Date('2026-11-29T10:05:00.250Z'),
        editor: ALICE,
    });
}
