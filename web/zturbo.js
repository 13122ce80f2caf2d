// Z-Image Turbo: the sampler's width, height and batch_size do nothing while latent_image is connected (the latent
// sets the size), so they are hidden then and come back when the link is removed. Their values are kept and saved.
import { app } from "../../scripts/app.js";

const SIZE_WIDGETS = new Set(["width", "height", "batch_size"]);

function latentLinked(node) {
    const input = node.inputs?.find((i) => i.name === "latent_image");
    return input?.link != null;
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

function syncSizeWidgets(node) {
    const hide = latentLinked(node);
    let changed = false;
    for (const widget of node.widgets ?? []) {
        if (!SIZE_WIDGETS.has(widget.name) || !!widget.hidden === hide) continue;
        hideWidget(widget, hide);
        changed = true;
    }
    if (!changed) return;
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
