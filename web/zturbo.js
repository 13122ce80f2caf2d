// Z-Image Turbo: the sampler's width, height and batch_size do nothing while latent_image is connected (the latent
// sets the size), so they are hidden then and come back when the link is removed. Their values are kept and saved.
import { app } from "../../scripts/app.js";

const SIZE_WIDGETS = new Set(["width", "height", "batch_size"]);

function latentLinked(node) {
    // node.isInputConnected(slot): frontends 1.32 to 1.58 (1.58 reports reading input.link as deprecated)
    const slot = node.inputs?.findIndex((i) => i.name === "latent_image") ?? -1;
    return slot >= 0 && node.isInputConnected(slot);
}

function hideWidget(widget, hide) {
    widget.hidden = hide; // drawing and node size (LiteGraph's isWidgetVisible), frontend 1.32 and later
    if (widget.options) widget.options.hidden = hide; // the Vue node renderer
    // Frontend 1.32 still lays out hidden widgets with their full height; a zero height (the usual way to hide a
    // widget in ComfyUI extensions) closes the gap.
    if (hide) {
        widget.zturboComputeSize = widget.computeSize;
        widget.computeSize = () => [0, -4];
    } else if ("zturboComputeSize" in widget) {
        widget.computeSize = widget.zturboComputeSize;
        delete widget.zturboComputeSize;
        if (!widget.computeSize) delete widget.computeSize;
    }
}

function refreshVueRows(node, widgets) {
    // Nodes 2.0 of frontends before widget.visibility existed (1.49) reads `hidden` when the node's widget list
    // changes, not when a widget changes: take each changed widget out of the list and put it back in its place, as
    // the frontend's own dynamic widgets change the list. Where widgets carry `visibility` (1.58), `hidden` is live.
    if (widgets.every((widget) => "visibility" in widget)) return;
    for (const widget of widgets) {
        const index = node.widgets.indexOf(widget);
        node.widgets.splice(index, 1);
        node.widgets.splice(index, 0, widget);
    }
}

function syncSizeWidgets(node) {
    const hide = latentLinked(node);
    const changed = (node.widgets ?? []).filter((widget) => SIZE_WIDGETS.has(widget.name) && !!widget.hidden !== hide);
    for (const widget of changed) hideWidget(widget, hide);
    if (!changed.length) return;
    refreshVueRows(node, changed);
    const [, height] = node.computeSize();
    node.setSize([node.size[0], height]);
    node.setDirtyCanvas?.(true, true);
}

function chain(object, method, after) {
    const original = object[method];
    object[method] = function (...args) {
        const result = original?.apply(this, args);
        after(this);
        return result;
    };
}

app.registerExtension({
    name: "ZImageTurbo.SamplerSizeFromLatent",
    nodeCreated(node) {
        if (node.comfyClass !== "ZTurboSampler") return;
        chain(node, "onConnectionsChange", syncSizeWidgets);
        chain(node, "onConfigure", syncSizeWidgets);
        syncSizeWidgets(node);
    },
});
