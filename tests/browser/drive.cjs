// Drives ComfyUI's real frontend in Debian's chromium (playwright-core, no browser download) for
// tests/test_browser.py:   node drive.cjs PLAN.json
// PLAN: {url, pack, out, chromium, modes: ["classic", "vue"], workflows: [{name, run: [mode...], edits: [{type,
//        widget, value}]}], templates: bool, thumbnails: bool}. For each mode (Nodes 2.0 = the setting
//        Comfy.VueNodes.Enabled) the page is loaded afresh and every workflow opened. Writes OUT/results.json and
//        screenshots (PNG) to OUT; the Python test asserts on them.
"use strict";
const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");

const plan = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const results = { modes: {}, console: [], failed_requests: [], thumbnails_served: [], frontend_version: null };
const QUIET_MS = Number(plan.quiet_ms || 180000); // a run fails after this long WITHOUT any progress event
const DIALOG = '.p-dialog, [role="dialog"]';

function shot(page, name) {
    const file = path.join(plan.out, `${name}.png`);
    return page.screenshot({ path: file }).then(() => file);
}

async function dialogs(page) {
    // PrimeVue dialogs (missing nodes, missing models, errors) and error toasts that are on screen
    return page.evaluate(() => {
        const seen = [];
        // PrimeVue dialogs (frontend 1.32) and role=dialog ones (1.49's newer dialogs), error toasts
        for (const el of document.querySelectorAll('.p-dialog, [role="dialog"], [role="alertdialog"], .p-toast-message-error')) {
            const box = el.getBoundingClientRect();
            if (box.width > 0 && box.height > 0) seen.push(el.innerText.slice(0, 600));
        }
        return seen;
    });
}

async function closeDialogs(page) {
    for (let i = 0; i < 5 && (await dialogs(page)).length; i++) await page.keyboard.press("Escape");
}

async function graphState(page) {
    return page.evaluate(() => {
        const app = window.app;
        const serialized = app.graph.serialize();
        const byId = Object.fromEntries(serialized.nodes.map((n) => [n.id, n]));
        const vc = app.canvas.visible_area ? Array.from(app.canvas.visible_area) : null;
        const rect = app.canvas.canvas.getBoundingClientRect();
        const { scale, offset } = app.canvas.ds;
        // Nodes 2.0 draws each node as a DOM element: its box on the page, in graph units
        const domBox = (id) => {
            const el = document.querySelector(`[data-node-id="${id}"]`);
            if (!el) return null;
            const r = el.getBoundingClientRect();
            return [(r.left - rect.left) / scale - offset[0], (r.top - rect.top) / scale - offset[1], r.width / scale, r.height / scale];
        };
        const bounding = (n) => Array.from(n.getBounding ? n.getBounding() : [n.pos[0], n.pos[1], n.size[0], n.size[1]]);
        return {
            nodes: app.graph.nodes.map((n) => ({
                id: n.id,
                type: n.type,
                title: n.title,
                has_errors: !!n.has_errors,
                widgets_values: byId[n.id]?.widgets_values ?? null,
                hidden_widgets: (n.widgets ?? []).filter((w) => w.hidden).map((w) => w.name),
                bounding: bounding(n), // LiteGraph's box: title bar and body
                dom_box: domBox(n.id), // what Nodes 2.0 draws (null on the canvas renderer)
                dom_text: document.querySelector(`[data-node-id="${n.id}"]`)?.innerText ?? null,
            })),
            visible_area: vc,
            // the nodes' union on the page, in CSS pixels (for thumbnails)
            screen_box: (() => {
                let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
                for (const n of app.graph.nodes) {
                    const b = domBox(n.id) ?? bounding(n);
                    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
                    x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
                }
                return [rect.left + (x0 + offset[0]) * scale, rect.top + (y0 + offset[1]) * scale, (x1 - x0) * scale, (y1 - y0) * scale];
            })(),
            ds: { scale, offset: Array.from(offset) },
            // below this zoom LiteGraph draws nodes without text (its level-of-detail switch)
            lod_threshold: app.canvas._lowQualityZoomThreshold ?? app.canvas.low_quality_zoom_threshold ?? null,
            low_quality: app.canvas.low_quality ?? null,
        };
    });
}

async function setSetting(id, value) {
    const r = await fetch(`${plan.url}/api/settings/${id}`, { method: "POST", body: JSON.stringify(value), headers: { "Content-Type": "application/json" } });
    if (!r.ok) throw new Error(`POST /api/settings/${id}: ${r.status}`);
}

async function openApp(page, mode) {
    await setSetting("Comfy.VueNodes.Enabled", mode === "vue");
    await page.goto(plan.url, { waitUntil: "domcontentloaded" });
    await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.app?.api, null, { timeout: 120000 });
    // the pack's web extension registered (web/zturbo.js)
    await page.waitForFunction(() => (window.app.extensions ?? []).some((e) => e.name === "ZImageTurbo.SamplerSizeFromLatent"),
                               null, { timeout: 60000 }).catch(() => {});
    return page.evaluate((mode) => {
        // LiteGraph reports each deprecation once per page; repeated, every use shows with its caller's stack
        if (window.LiteGraph && "alwaysRepeatWarnings" in window.LiteGraph) window.LiteGraph.alwaysRepeatWarnings = true;
        window.__zt = { events: 0, errors: [], done: [] };
        for (const type of ["progress", "executing", "executed", "execution_start", "execution_cached"])
            window.app.api.addEventListener(type, () => { window.__zt.events++; });
        window.app.api.addEventListener("execution_error", (e) => { window.__zt.events++; window.__zt.errors.push(e.detail); });
        window.app.api.addEventListener("execution_success", (e) => { window.__zt.events++; window.__zt.done.push(e.detail); });
        return {
            extension_loaded: (window.app.extensions ?? []).some((e) => e.name === "ZImageTurbo.SamplerSizeFromLatent"),
            frontend_version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
            vue_nodes: !!window.app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled"),
            vue_autoscale: window.app.extensionManager?.setting?.get?.("Comfy.VueNodes.AutoScaleLayout") === true,
            mode,
        };
    }, mode);
}

async function loadWorkflow(page, name) {
    // what a click on the template card does: fetch the pack's template, load it as a template
    return page.evaluate(async ({ pack, name }) => {
        const response = await window.app.api.fetchApi(`/workflow_templates/${encodeURIComponent(pack)}/${encodeURIComponent(name)}.json`);
        if (!response.ok) return { status: response.status };
        const data = await response.json();
        await window.app.loadGraphData(data, true, true, name, { openSource: "template" });
        return { status: response.status, file: data };
    }, { pack: plan.pack, name });
}

async function settle(page) {
    // two animation frames: fitView runs in one (1.32 requestAnimationFrame), the draw in the next
    for (let i = 0; i < 3; i++) await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => r())));
    await page.waitForLoadState("networkidle").catch(() => {});
}

async function settleNodes(page, mode) {
    // Nodes 2.0 mounts one element per node and measures it over a few frames: wait (bounded) until every node is
    // in the DOM and no box changed between two frames
    await settle(page);
    if (mode !== "vue") return;
    let last = null;
    for (let i = 0; i < 200; i++) {
        const boxes = await page.evaluate(() => {
            const els = [...document.querySelectorAll("[data-node-id]")];
            if (els.length < window.app.graph.nodes.length) return null;
            return JSON.stringify(els.map((e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height].map(Math.round); }));
        });
        if (boxes && boxes === last) return;
        last = boxes;
        await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => r())));
    }
    throw new Error("Nodes 2.0: the node elements did not settle in 200 frames");
}

async function setWidgets(page, edits) {
    return page.evaluate((edits) => {
        const done = [];
        for (const { type, widget, value } of edits) {
            for (const node of window.app.graph.nodes.filter((n) => n.type === type)) {
                const w = node.widgets.find((x) => x.name === widget);
                w.value = value;
                w.callback?.(value);
                done.push([node.id, widget, value]);
            }
        }
        window.app.graph.setDirtyCanvas(true, true);
        return done;
    }, edits);
}

async function toggleLatent(page) {
    // as a user would: remove the sampler's latent link, then connect it again; the size widgets (and, in Nodes 2.0,
    // their rows) show while it is removed and hide again
    return page.evaluate(async () => {
        const frames = async () => { for (let i = 0; i < 3; i++) await new Promise((r) => requestAnimationFrame(() => r())); };
        const state = (node) => ({
            hidden: (node.widgets ?? []).filter((w) => w.hidden).map((w) => w.name),
            dom_text: document.querySelector(`[data-node-id="${node.id}"]`)?.innerText ?? null,
        });
        const out = [];
        for (const node of window.app.graph.nodes.filter((n) => n.type === "ZTurboSampler")) {
            const slot = node.inputs.findIndex((i) => i.name === "latent_image");
            if (!node.isInputConnected(slot)) continue;
            const link = node.getInputLink(slot);
            const origin = window.app.graph.getNodeById(link.origin_id);
            node.disconnectInput(slot);
            await frames();
            const unlinked = state(node);
            origin.connect(link.origin_slot, node, slot);
            await frames();
            out.push({ id: node.id, unlinked, relinked: state(node) });
        }
        return out;
    });
}

async function runFromButton(page, name) {
    const before = await page.evaluate(() => ({ done: window.__zt.done.length, errors: window.__zt.errors.length }));
    await page.locator('[data-testid="queue-button"]').first().click();
    let events = -1, lastProgress = Date.now();
    for (;;) {
        const state = await page.evaluate((before) => {
            const save = window.app.graph.nodes.filter((n) => n.type === "SaveImage");
            // the canvas renderer keeps the output as node.imgs; Nodes 2.0 shows it as an <img> in the node
            const imgs = save.flatMap((n) => n.imgs?.length ? n.imgs
                : [...(document.querySelector(`[data-node-id="${n.id}"]`)?.querySelectorAll("img") ?? [])]);
            return {
                events: window.__zt.events,
                error: window.__zt.errors.slice(before.errors)[0] ?? null,
                finished: window.__zt.done.length > before.done,
                images: imgs.map((i) => ({ src: i.src, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight })),
            };
        }, before);
        if (state.error) return { ok: false, error: state.error };
        if (state.finished && state.images.length && state.images.every((i) => i.complete && i.width > 0)) {
            await settle(page);
            return { ok: true, images: state.images, screenshot: await shot(page, `${name} - after run`) };
        }
        if (state.events !== events) { events = state.events; lastProgress = Date.now(); }
        if (Date.now() - lastProgress > QUIET_MS)
            return { ok: false, error: `no progress for ${QUIET_MS / 1000} s`, state, screenshot: await shot(page, `${name} - stuck`) };
        await page.waitForTimeout(250); // polling interval, not a wait for the result
    }
}

async function templateBrowser(page) {
    // the template browser as a user sees it: the pack's category (Extensions -> its folder name) with its cards,
    // their titles (cut off or not), descriptions and thumbnails; then a search for one of them
    const out = {};
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
    await page.waitForSelector(DIALOG, { timeout: 30000 });
    await settle(page);
    // the side bar's entry for the pack: its folder name under Extensions
    const entry = page.locator(DIALOG).getByText(plan.pack, { exact: true }).first();
    await entry.click({ timeout: 30000 });
    await settle(page);
    // card images load lazily (1.49 and later): scroll the grid to its end, then wait (bounded) for the thumbnails
    await page.evaluate((DIALOG) => {
        for (const el of document.querySelector(DIALOG).querySelectorAll("*"))
            if (el.scrollHeight > el.clientHeight + 8) el.scrollTop = el.scrollHeight;
    }, DIALOG);
    for (let i = 0; i < 40 && new Set(results.thumbnails_served).size < plan.workflows.length; i++)
        await page.waitForTimeout(250);
    await settle(page);
    out.cards = await page.evaluate(() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')].map((card) => {
        const title = card.querySelector("h3");
        const description = card.querySelector("p");
        const img = card.querySelector("img");
        return {
            name: card.dataset.testid.replace("template-workflow-", ""),
            title: title?.innerText ?? null,
            // cut off: the text is wider (truncate) or taller (line-clamp) than its box
            title_cut: title ? title.scrollWidth > title.clientWidth + 1 || title.scrollHeight > title.clientHeight + 1 : null,
            title_width: title ? [title.scrollWidth, title.clientWidth] : null,
            description: description?.innerText ?? null,
            image: img ? { complete: img.complete, width: img.naturalWidth } : null,
        };
    }));
    out.screenshot = await shot(page, "template browser - the pack's category");
    await closeDialogs(page);
    return out;
}

function consoleEntry(level, text, stack, mode) {
    results.console.push({ level, text: String(text).slice(0, 600), stack: String(stack ?? "").slice(0, 3000), mode });
}

async function collectConsole(page, mode) {
    // console.warn / console.error calls with their stacks, recorded by the init script below
    for (const e of await page.evaluate(() => window.__ztConsole ?? []).catch(() => []))
        consoleEntry(e.level, e.text, e.stack, mode);
}

(async () => {
    fs.mkdirSync(plan.out, { recursive: true });
    const browser = await chromium.launch({
        executablePath: plan.chromium,
        args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
    });
    let mode = null, page = null;
    try {
        const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
        page = await context.newPage();
        await page.addInitScript(() => {
            window.__ztConsole = [];
            for (const level of ["warn", "error"]) {
                const original = console[level];
                console[level] = function (...args) {
                    window.__ztConsole.push({ level, text: args.map((a) => (a instanceof Error ? a.stack : String(a))).join(" "), stack: new Error().stack });
                    return original.apply(this, args);
                };
            }
        });
        page.on("pageerror", (e) => consoleEntry("pageerror", e.message, e.stack, mode));
        page.on("response", (r) => {
            const url = decodeURIComponent(r.url());
            if (r.status() >= 400) results.failed_requests.push(`${r.status()} ${url}`);
            // card thumbnails: 1.32 shows them as <img src>, 1.49 fetches them and shows a blob: URL
            else if (url.includes("/workflow_templates/") && url.endsWith(".jpg")) results.thumbnails_served.push(url);
        });
        // A first start opens the template browser by itself (Comfy.TutorialCompleted): mark it seen, so that each
        // workflow is loaded into a clear canvas; the template browser is checked on its own below.
        await setSetting("Comfy.TutorialCompleted", true);
        for (mode of plan.modes) {
            // The early Nodes 2.0 (frontend 1.32) rescales every layout by 1.2 when it is switched on (the setting
            // Comfy.VueNodes.AutoScaleLayout, gone in 1.49) and misplaces nodes after a tab switch: not checked there
            if (mode === "vue" && results.vue_autoscale) continue;
            const app = await openApp(page, mode);
            results.extension_loaded = app.extension_loaded;
            results.frontend_version = app.frontend_version;
            results.vue_autoscale ??= app.vue_autoscale;
            const done = results.modes[mode] = { vue_nodes: app.vue_nodes, workflows: {} };
            await settle(page);
            await closeDialogs(page); // a first-start dialog (e.g. release notes) is not ours
            for (const wf of plan.workflows) {
                const r = {};
                const loaded = await loadWorkflow(page, wf.name);
                r.status = loaded.status;
                await settleNodes(page, mode);
                r.dialogs = await dialogs(page);
                Object.assign(r, await graphState(page));
                r.screenshot = await shot(page, `${wf.name} - ${mode}`);
                await closeDialogs(page);
                if ((wf.run ?? []).includes(mode)) {
                    r.edits = await setWidgets(page, wf.edits ?? []);
                    r.run = await runFromButton(page, `${wf.name} - ${mode}`);
                    r.dialogs_after_run = await dialogs(page);
                    await closeDialogs(page);
                }
                r.toggled = await toggleLatent(page);
                done.workflows[wf.name] = r;
            }
            if (plan.templates && mode === plan.modes[0]) {
                try {
                    results.templates = await templateBrowser(page);
                } catch (err) {  // the workflow results above still count; the template test reports this
                    results.templates = { error: String(err.stack || err), screenshot: await shot(page, "template browser - error") };
                }
            }
            await collectConsole(page, mode);
        }
    } catch (err) {
        results.fatal = `${mode}: ${err.stack || err}`;
        if (page) await collectConsole(page, mode);
    } finally {
        fs.writeFileSync(path.join(plan.out, "results.json"), JSON.stringify(results, null, 1));
        await browser.close();
    }
})();
