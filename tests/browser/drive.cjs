// Drives ComfyUI's real frontend in Debian's chromium (playwright-core, no browser download) for
// tests/test_browser.py:   node drive.cjs PLAN.json
// PLAN: {url, pack, out, chromium, workflows: [{name, run, edits: [{type, widget, value}]}], templates: bool,
//        thumbnails: bool}. Writes OUT/results.json and screenshots (PNG) to OUT; the Python test asserts on them.
"use strict";
const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");

const plan = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const results = { workflows: {}, console_errors: [], failed_requests: [], thumbnails_served: [], frontend_version: null };
const QUIET_MS = Number(plan.quiet_ms || 180000); // a run fails after this long WITHOUT any progress event

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
        const LiteGraph = window.LiteGraph ?? app.graph.constructor.LiteGraph;
        const registered = (type) => !!(window.LiteGraph?.registered_node_types?.[type] ?? true);
        const serialized = app.graph.serialize();
        const byId = Object.fromEntries(serialized.nodes.map((n) => [n.id, n]));
        const vc = app.canvas.visible_area ? Array.from(app.canvas.visible_area) : null;
        return {
            nodes: app.graph.nodes.map((n) => ({
                id: n.id,
                type: n.type,
                title: n.title,
                registered: registered(n.type),
                has_errors: !!n.has_errors,
                widgets_values: byId[n.id]?.widgets_values ?? null,
                hidden_widgets: (n.widgets ?? []).filter((w) => w.hidden).map((w) => w.name),
                bounding: Array.from(n.getBounding ? n.getBounding() : [n.pos[0], n.pos[1], n.size[0], n.size[1]]),
            })),
            visible_area: vc,
            // the nodes' union on the page, in CSS pixels (for thumbnails and the "fitted" check)
            screen_box: (() => {
                const rect = app.canvas.canvas.getBoundingClientRect();
                const { scale, offset } = app.canvas.ds;
                let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
                for (const n of app.graph.nodes) {
                    const b = n.getBounding ? n.getBounding() : [n.pos[0], n.pos[1], n.size[0], n.size[1]];
                    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
                    x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
                }
                const k = rect.width / app.canvas.canvas.width * (window.devicePixelRatio || 1);
                return [rect.left + (x0 + offset[0]) * scale * k / (window.devicePixelRatio || 1),
                        rect.top + (y0 + offset[1]) * scale * k / (window.devicePixelRatio || 1),
                        (x1 - x0) * scale, (y1 - y0) * scale];
            })(),
            // page boxes of what covers the canvas: side bar and top menu
            overlays: [...document.querySelectorAll(".side-tool-bar-container, .comfyui-menu, .comfy-menu-button-wrapper, .workflow-tabs-container, nav, header")]
                .map((el) => { const r = el.getBoundingClientRect(); return { cls: String(el.className).slice(0, 80), box: [r.left, r.top, r.width, r.height] }; })
                .filter((o) => o.box[2] > 0 && o.box[3] > 0),
            ds: { scale: app.canvas.ds.scale, offset: Array.from(app.canvas.ds.offset) },
            // below this zoom LiteGraph draws nodes without text (its level-of-detail switch)
            lod_threshold: app.canvas._lowQualityZoomThreshold ?? app.canvas.low_quality_zoom_threshold ?? null,
            low_quality: app.canvas.low_quality ?? null,
        };
    });
}

async function waitForApp(page) {
    await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.app?.api, null,
                               { timeout: 120000 });
    // the pack's web extension registered (web/zturbo.js)
    await page.waitForFunction(() => (window.app.extensions ?? []).some((e) => e.name === "ZImageTurbo.SamplerSizeFromLatent"),
                               null, { timeout: 60000 }).catch(() => {});
    results.extension_loaded = await page.evaluate(
        () => (window.app.extensions ?? []).some((e) => e.name === "ZImageTurbo.SamplerSizeFromLatent"));
    results.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
    await page.evaluate(() => {
        window.__zt = { events: 0, errors: [], done: [] };
        for (const type of ["progress", "executing", "executed", "execution_start", "execution_cached"])
            window.app.api.addEventListener(type, () => { window.__zt.events++; });
        window.app.api.addEventListener("execution_error", (e) => { window.__zt.events++; window.__zt.errors.push(e.detail); });
        window.app.api.addEventListener("execution_success", (e) => { window.__zt.events++; window.__zt.done.push(e.detail); });
    });
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

async function runFromButton(page, name) {
    const before = await page.evaluate(() => ({ done: window.__zt.done.length, errors: window.__zt.errors.length }));
    await page.locator('[data-testid="queue-button"]').first().click();
    let events = -1, lastProgress = Date.now();
    for (;;) {
        const state = await page.evaluate((before) => {
            const save = window.app.graph.nodes.filter((n) => n.type === "SaveImage");
            const imgs = save.flatMap((n) => n.imgs ?? []);
            return {
                events: window.__zt.events,
                error: window.__zt.errors.slice(before.errors)[0] ?? null,
                finished: window.__zt.done.length > before.done,
                images: imgs.map((i) => ({ src: i.src, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight })),
                outputs: save.map((n) => window.app.nodeOutputs?.[String(n.id)]?.images ?? null),
            };
        }, before);
        if (state.error) return { ok: false, error: state.error };
        if (state.finished && state.images.length && state.images.every((i) => i.complete && i.width > 0)) {
            await settle(page);
            return { ok: true, images: state.images, outputs: state.outputs, screenshot: await shot(page, `${name} - after run`) };
        }
        if (state.events !== events) { events = state.events; lastProgress = Date.now(); }
        if (Date.now() - lastProgress > QUIET_MS)
            return { ok: false, error: `no progress for ${QUIET_MS / 1000} s`, state, screenshot: await shot(page, `${name} - stuck`) };
        await page.waitForTimeout(250); // polling interval, not a wait for the result
    }
}

async function templateBrowser(page) {
    // the template browser as a user sees it: our pack's cards, their titles, thumbnails and the search
    const out = {};
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
    const DIALOG = '.p-dialog, [role="dialog"]';
    await page.waitForSelector(DIALOG, { timeout: 30000 });
    await settle(page);
    const search = page.locator(`:is(${DIALOG}) input[type="text"], :is(${DIALOG}) input[placeholder]`).first();
    await search.fill("Z-Image Turbo");
    await page.waitForTimeout(600); // the search box debounces its input (50-300 ms)
    await settle(page);
    // 1.49 loads card images lazily (when scrolled into view): scroll the card grid to its end, then wait
    // (bounded) for the pack's thumbnails to arrive
    await page.evaluate((DIALOG) => {
        for (const el of document.querySelector(DIALOG).querySelectorAll("*"))
            if (el.scrollHeight > el.clientHeight + 8) el.scrollTop = el.scrollHeight;
    }, DIALOG);
    for (let i = 0; i < 40 && new Set(results.thumbnails_served).size < (plan.workflows.length); i++)
        await page.waitForTimeout(250);
    await settle(page);
    out.cards = await page.evaluate((DIALOG) => {
        const dialog = document.querySelector(DIALOG);
        // the cards' images (the dialog's content may be rendered outside .p-dialog): every <img> on the page
        const imgs = [...document.querySelectorAll("img")].filter((i) => decodeURIComponent(i.currentSrc || i.src).includes("workflow_templates"));
        return {
            text: dialog.innerText.slice(0, 4000),
            thumbnails: imgs.map((i) => ({ src: decodeURIComponent(i.currentSrc || i.src), complete: i.complete, width: i.naturalWidth })),
            all_images: [...document.querySelectorAll("img")].map((i) => (i.currentSrc || i.src).slice(0, 200)),
        };
    }, DIALOG);
    out.screenshot = await shot(page, "template browser - search Z-Image Turbo");
    await closeDialogs(page);
    return out;
}

(async () => {
    fs.mkdirSync(plan.out, { recursive: true });
    const browser = await chromium.launch({
        executablePath: plan.chromium,
        args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
    });
    try {
        const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
        const page = await context.newPage();
        page.on("console", (m) => { if (m.type() === "error") results.console_errors.push(m.text().slice(0, 500)); });
        page.on("pageerror", (e) => results.console_errors.push(`pageerror: ${String(e).slice(0, 500)}`));
        page.on("response", (r) => {
            const url = decodeURIComponent(r.url());
            if (r.status() >= 400) results.failed_requests.push(`${r.status()} ${url}`);
            // card thumbnails: 1.32 shows them as <img src>, 1.49 fetches them and shows a blob: URL
            else if (url.includes("/workflow_templates/") && url.endsWith(".jpg")) results.thumbnails_served.push(url);
        });
        // A first start opens the template browser by itself (Comfy.TutorialCompleted): mark it seen, so that each
        // workflow is loaded into a clear canvas; the template browser is checked on its own below.
        const set = await fetch(`${plan.url}/api/settings/Comfy.TutorialCompleted`,
                                { method: "POST", body: "true", headers: { "Content-Type": "application/json" } });
        if (!set.ok) throw new Error(`POST /api/settings: ${set.status}`);
        await page.goto(plan.url, { waitUntil: "domcontentloaded" });
        await waitForApp(page);
        await settle(page);
        await closeDialogs(page); // a first-start dialog (e.g. release notes) is not ours
        for (const wf of plan.workflows) {
            const r = {};
            const loaded = await loadWorkflow(page, wf.name);
            r.status = loaded.status;
            await settle(page);
            r.dialogs = await dialogs(page);
            Object.assign(r, await graphState(page));
            r.screenshot = await shot(page, wf.name);
            if (plan.thumbnails) {
                await page.evaluate(() => window.app.canvas.setDirty(true, true));
                r.thumbnail = await shot(page, `${wf.name} - thumbnail source`);
            }
            await closeDialogs(page);
            if (wf.run) {
                r.edits = await setWidgets(page, wf.edits ?? []);
                r.run = await runFromButton(page, wf.name);
                r.dialogs_after_run = await dialogs(page);
                await closeDialogs(page);
            }
            results.workflows[wf.name] = r;
        }
        if (plan.templates) {
            try {
                results.templates = await templateBrowser(page);
            } catch (err) {  // the workflow results above still count; the template test reports this
                results.templates = { error: String(err.stack || err), screenshot: await shot(page, "template browser - error") };
            }
        }
    } catch (err) {
        results.fatal = String(err.stack || err);
    } finally {
        fs.writeFileSync(path.join(plan.out, "results.json"), JSON.stringify(results, null, 1));
        await browser.close();
    }
})();
