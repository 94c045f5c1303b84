// Run after `rc-apps package` (npm run package): the zip must hold what Rocket.Chat's
// AppPackageParser needs (app.json, the compiled classFile), no test code, and its code must load
// the way the Apps-Engine Deno runtime loads it: wrapped in a function whose `require` knows only
// the allowed native modules and the apps-engine, with no globalThis.
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';

const ROOT = path.resolve(__dirname, '..', '..', '..');

// As in packages/apps-engine/deno-runtime/handlers/app/construct.ts of Rocket.Chat.
const ALLOWED_NATIVE_MODULES = ['path', 'url', 'crypto', 'buffer', 'stream', 'net', 'http', 'https', 'zlib', 'util', 'punycode', 'os', 'querystring', 'fs'];

/** Entries of a zip from its central directory: name -> uncompressed bytes. */
export function readZip(zip: Buffer): Map<string, Buffer> {
    const entries = new Map<string, Buffer>();
    const end = zip.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]));
    assert.ok(end >= 0, 'no end of central directory: not a zip');
    let at = zip.readUInt32LE(end + 16);
    for (let count = zip.readUInt16LE(end + 10); count > 0; count--) {
        assert.equal(zip.readUInt32LE(at), 0x02014b50, 'broken central directory');
        const method = zip.readUInt16LE(at + 10);
        const size = zip.readUInt32LE(at + 20);
        const nameLength = zip.readUInt16LE(at + 28);
        const skip = nameLength + zip.readUInt16LE(at + 30) + zip.readUInt16LE(at + 32);
        const local = zip.readUInt32LE(at + 42);
        const name = zip.toString('utf8', at + 46, at + 46 + nameLength);
        const start = local + 30 + zip.readUInt16LE(local + 26) + zip.readUInt16LE(local + 28);
        const raw = zip.subarray(start, start + size);
        entries.set(name, method === 8 ? zlib.inflateRawSync(raw) : raw);
        at += 46 + skip;
    }
    return entries;
}

function loadLikeDenoRuntime(files: Map<string, Buffer>, classFile: string): unknown {
    const cache = new Map<string, unknown>();
    const load = (file: string): unknown => {
        if (!cache.has(file)) {
            const module = { exports: {} as Record<string, unknown> };
            cache.set(file, module.exports);
            const code = files.get(file)?.toString('utf8');
            assert.ok(code, `${file} is not in the package`);
            const run = new Function('exports', 'module', 'require', 'globalThis', 'Deno', code);
            run(module.exports, module, requireFrom(path.posix.dirname(file)), undefined, undefined);
            cache.set(file, module.exports);
        }
        return cache.get(file);
    };
    // Relative requires stand for the runtime's bundling of a multi-file package (bundler.ts).
    const requireFrom = (dir: string) => (name: string) => {
        if (name.startsWith('.')) {
            return load(path.posix.join(dir, `${name}.js`));
        }
        if (ALLOWED_NATIVE_MODULES.includes(name)) {
            return require(`node:${name}`);
        }
        if (name.startsWith('@rocket.chat/apps-engine/')) {
            return require(path.join(ROOT, 'node_modules', name));
        }
        throw new Error(`Module ${name} is not allowed`);
    };
    return load(classFile);
}

function main(): void {
    const info = JSON.parse(fs.readFileSync(path.join(ROOT, 'app.json'), 'utf8'));
    const zipPath = path.join(ROOT, 'dist', `${info.nameSlug}_${info.version}.zip`);
    const files = readZip(fs.readFileSync(zipPath));
    const names = [...files.keys()];
    const classFile = info.classFile.replace(/\.ts$/, '.js');
    for (const needed of ['app.json', classFile, info.iconFile]) {
        assert.ok(files.has(needed), `${zipPath} lacks ${needed}; it has ${names.join(', ')}`);
    }
    const stray = names.filter((name) => name.startsWith('test/') || name.endsWith('.ts') || name.startsWith('node_modules/'));
    assert.deepEqual(stray, [], `${zipPath} must not ship tests, sources or node_modules`);
    assert.deepEqual(JSON.parse(files.get('app.json')!.toString('utf8')).implements, info.implements);

    // The runtime takes the first export as the app class and constructs it with (info, logger).
    const exports = loadLikeDenoRuntime(files, classFile) as Record<string, new (...args: unknown[]) => { getName(): string }>;
    const AppClass = Object.values(exports)[0];
    const silent = { debug: () => undefined };
    assert.equal(new AppClass(info, silent).getName(), info.name);
    console.log(`package ok: ${path.relative(ROOT, zipPath)} loads as the Deno runtime loads it (${names.join(', ')})`);
}

main();
