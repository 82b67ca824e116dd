"""The local web app (gradio): sample a run, and edit a sample or an uploaded picture by painting
or picking the region to regenerate (docs/app.md). All the work is ``app_core``'s; this file only
lays out the page and turns what the page sends into its calls, and its errors into a status line.
"""
from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

from . import app_core as core
from .ar_plan import ORDERS
from .checkpoint import CheckpointError

USER_ERRORS = (ValueError, CheckpointError, FloatingPointError, OSError, KeyError)
CSS = "#sample-grid img, #edit-figure img, #sample-path img, #edit-path img { image-rendering: pixelated; }"


def _message(e: Exception) -> str:
    """One line for the page: the library's own message for refused input; for anything else the
    type and message (the traceback goes to the server's stderr, never to the page)."""
    if isinstance(e, USER_ERRORS):
        return f"Error: {e.args[0] if isinstance(e, KeyError) and e.args else e}"
    traceback.print_exc(file=sys.stderr)
    return f"Error: unexpected {type(e).__name__}: {e}"


def build_app(am: core.AppModel, workdir: str | Path | None = None):
    """The page for a loaded run (``app_core.load_app_model``) -> ``gr.Blocks`` (call ``.launch``)."""
    import gradio as gr

    work = Path(workdir or tempfile.mkdtemp(prefix="causalfusion-app-"))
    counter = iter(range(1 << 62))  # GIF names: one per request, never reused while the app runs

    def gif_name(kind: str) -> Path:
        return work / f"{kind}-{next(counter)}.gif"

    side, scale = am.size, am.scale
    view = side * scale
    names = ""
    if am.class_names and len(am.class_names) <= 20 and am.class_names != [str(i) for i in range(am.num_classes)]:
        names = " — " + ", ".join(f"{i}: {n}" for i, n in enumerate(am.class_names))
    c = am.model.cfg
    intro = (f"**{am.ckpt}**: {side}x{side} px, {am.channels} channel(s), {c.num_tokens} tokens, "
             f"classes 0..{am.num_classes - 1}{names}; trained order: {am.trained_order}.")

    with gr.Blocks(title="CausalFusion", analytics_enabled=False) as demo:
        gr.Markdown(f"## CausalFusion — sample and edit\n{intro}")
        samples = gr.State(None)  # float32 [N, C, H, W] of the last sampling
        source = gr.State(None)  # float32 [C, H, W]: the image being edited, at the model's size
        with gr.Row():
            with gr.Column(scale=1, min_width=240):  # the sampler, shared by both tabs
                ar_steps = gr.Number(1, label="AR steps S", precision=0, minimum=1, elem_id="ar-steps")
                groups = gr.Textbox("", label="or group sizes (e.g. 4,4,8)", elem_id="groups")
                order = gr.Radio(list(ORDERS), value=am.trained_order, label="token order", elem_id="order")
                sample_steps = gr.Textbox("50", label="diffusion steps per AR step (or one per AR step)",
                                          elem_id="sample-steps")
                with gr.Row():
                    cfg = gr.Number(1.0, label="CFG scale", min_width=80, elem_id="cfg")
                    cfg_interval = gr.Textbox("0,1000", label="CFG interval", min_width=80, elem_id="cfg-interval")
                seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
            with gr.Column(scale=3):
                with gr.Tab("Sample"):
                    with gr.Row():
                        classes = gr.Textbox("", label="class(es), e.g. 3 or 0,1,2 (empty: all)", elem_id="classes")
                        n = gr.Number(8, label="number of images", precision=0, minimum=1, maximum=core.MAX_IMAGES,
                                      elem_id="n")
                        sample_btn = gr.Button("Sample", variant="primary", elem_id="sample-btn")
                    sample_status = gr.Textbox(label="status", interactive=False, elem_id="sample-status")
                    with gr.Row():
                        grid = gr.Image(label="samples", format="png", type="numpy", interactive=False,
                                        elem_id="sample-grid")
                        sample_gif = gr.Image(label="generation path", type="filepath", interactive=False,
                                              elem_id="sample-path")
                with gr.Tab("Edit"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            with gr.Row():
                                pick = gr.Number(1, label="sample #", precision=0, minimum=1, min_width=80,
                                                 elem_id="sample-index")
                                use_sample = gr.Button("Edit this sample", elem_id="use-sample")
                            upload = gr.UploadButton(f"or upload a picture (made {side}x{side})", type="filepath",
                                                     elem_id="upload")
                            editor = gr.ImageEditor(
                                label="paint the mask", type="numpy",
                                image_mode="RGBA", sources=[], transforms=[], layers=False, canvas_size=(view, view),
                                fixed_canvas=True, height=view + 90, format="png", elem_id="editor",
                                brush=gr.Brush(default_size=max(2, scale), colors=[("#ff3030", 0.7)],
                                               color_mode="fixed"))
                        with gr.Column(scale=1):
                            mask = gr.Radio(list(core.MASK_CHOICES), value="center", label="mask", elem_id="mask")
                            fraction = gr.Slider(0.05, 1.0, value=0.5, step=0.05,
                                                 label="preset mask: fraction of the side", elem_id="mask-frac")
                            with gr.Row():
                                new_class = gr.Number(0, label="new class", precision=0, minimum=0,
                                                      maximum=am.num_classes - 1, min_width=80, elem_id="new-class")
                                variations = gr.Number(4, label="variations", precision=0, minimum=1,
                                                       maximum=core.MAX_IMAGES, min_width=80, elem_id="variations")
                            edit_btn = gr.Button("Edit", variant="primary", elem_id="edit-btn")
                            edit_status = gr.Textbox(label="status", interactive=False, lines=2, elem_id="edit-status")
                    with gr.Row():
                        figure = gr.Image(label="original | masked input | variations", format="png", type="numpy",
                                          interactive=False, height=view // 2 + 60, scale=3, elem_id="edit-figure")
                        edit_gif = gr.Image(label="generation path", type="filepath", interactive=False,
                                            height=view // 2 + 60, scale=1, elem_id="edit-path")
        sampler = [ar_steps, groups, order, sample_steps, cfg, cfg_interval, seed]

        def sampler_fields(ar, grp, ordr, steps, scale_cfg, interval, sd) -> dict:
            return dict(ar_steps=ar, groups=grp, order=ordr, sample_steps=steps, cfg=scale_cfg,
                        cfg_interval=interval, seed=sd)

        # gradio finds the progress tracker only among positional parameters: no *args here
        def on_sample(classes_text, count, ar, grp, ordr, steps, scale_cfg, interval, sd,
                      progress=gr.Progress(track_tqdm=True)):
            try:
                r = core.run_sample(am, classes=classes_text, n=count, gif=gif_name("sample"),
                                    **sampler_fields(ar, grp, ordr, steps, scale_cfg, interval, sd))
            except Exception as e:  # noqa: BLE001  (the page shows one line; the server keeps serving)
                return gr.skip(), gr.skip(), _message(e), gr.skip()
            return r.picture, r.gif, r.message, r.images.numpy()

        def editor_value(image: torch.Tensor) -> dict:
            bg = core.editor_background(image, am)
            return {"background": bg, "layers": [], "composite": bg}

        def on_use_sample(held, index):
            try:
                if held is None:
                    raise ValueError("no samples yet: sample on the Sample tab first")
                k = core._int(index, "sample #", 1, len(held))
                image = torch.from_numpy(np.asarray(held[k - 1]))
                return editor_value(image), image.numpy(), f"editing sample #{k}"
            except Exception as e:  # noqa: BLE001
                return gr.skip(), gr.skip(), _message(e)

        def on_upload(path):
            if path is None:
                return gr.skip(), gr.skip(), gr.skip()
            try:
                image, note = core.prepare_upload(path, am)
                return editor_value(image), image.numpy(), f"editing {note}"
            except Exception as e:  # noqa: BLE001
                return gr.skip(), gr.skip(), _message(e)

        def on_edit(held, painted, choice, frac, label, count, ar, grp, ordr, steps, scale_cfg, interval, sd,
                    progress=gr.Progress(track_tqdm=True)):
            try:
                layers = (painted or {}).get("layers") if isinstance(painted, dict) else None
                pixel_mask = core.build_mask(am, choice, frac, layers)
                image = None if held is None else torch.from_numpy(np.asarray(held))
                r = core.run_edit(am, image, pixel_mask, new_class=label, n=count, gif=gif_name("edit"),
                                  **sampler_fields(ar, grp, ordr, steps, scale_cfg, interval, sd))
            except Exception as e:  # noqa: BLE001
                return gr.skip(), gr.skip(), _message(e)
            return r.picture, r.gif, r.message

        sample_btn.click(on_sample, [classes, n, *sampler], [grid, sample_gif, sample_status, samples])
        use_sample.click(on_use_sample, [samples, pick], [editor, source, edit_status])
        upload.upload(on_upload, [upload], [editor, source, edit_status])
        edit_btn.click(on_edit, [source, editor, mask, fraction, new_class, variations, *sampler],
                       [figure, edit_gif, edit_status])
    return demo


def serve(am: core.AppModel, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page on ``host:port`` (one request at a time: the model is shared)."""
    import gradio as gr

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts to fetch
    demo = build_app(am).queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, show_error=False, quiet=True, ssr_mode=False,
                max_file_size="20mb", prevent_thread_lock=not block, theme=theme, css=CSS,
                footer_links=[])
    return demo
