"""ZTurboPrecisionGuard: the fp16 overflow policy for the text encoder, the sampler and the decoder."""

from __future__ import annotations

from zimage_core.guard import POLICIES

from .api import io
from .model import CATEGORY, MODEL_TOOLTIP, ZTurboModel


def report_text(zimage) -> str:
    """The guard's report (``PrecisionGuard.report()``) as a few lines of text."""
    guard = zimage.guard
    if guard is None:
        return f"precision guard: off ({zimage.policy.describe()})"
    report = guard.report()
    lines = [f"precision guard: {report['summary']}"]
    for event in report["events"]:
        step = f" at step {event['step'] + 1}" if event["step"] is not None else ""
        lines.append(f"- {event['component']} {event['block']}{step}: {event['action']} ({event['dtype']})")
    lines.append(f"checks: {report['checks']}, re-runs with block checks: {report['probe_runs']}")
    return "\n".join(lines)


class ZTurboPrecisionGuard(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboPrecisionGuard",
            display_name="Z-Image Turbo Precision Guard",
            category=CATEGORY,
            description="Sets how fp16 overflow (NaN, black images) is handled by every node that uses this model: "
                        "the text encoder, the sampler and the decoders. The sampler's guard_report output says "
                        "what happened.",
            inputs=[
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
                io.Combo.Input("policy", options=list(POLICIES), default="auto",
                               tooltip="off: plain fp16. detect: stop with an error naming the block that overflowed. "
                                       "auto: run just the overflowing blocks in bf16/fp32 (remembered, so paid once). "
                                       "clamp: ComfyUI's clipping to ±65504 (lossy)."),
            ],
            outputs=[ZTurboModel.Output(display_name="model", tooltip="The same model with this policy.")],
        )

    @classmethod
    def execute(cls, model, policy) -> io.NodeOutput:
        return io.NodeOutput(model.with_guard(policy))
