"""The Gradio page: layout, and thin handlers that turn callbacks' errors into UI messages.

`build_ui(studio)` only builds the Blocks; launching is `app.__main__`'s job (nothing is
launched at import time). The Generate button is also the API endpoint `generate`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import gradio as gr

from . import callbacks
from .callbacks import Settings, Studio
from .launcher import Launcher
from .runs import suggested_prompt
from .train_tab import build_train_tab

SWEEP_DEFAULT = "0, 0.5, 1, 1.5"
# Show small images (the tiny model draws 64 px) enlarged with hard pixel edges, so the
# base/LoRA difference is visible; Gradio would otherwise show them at their own size.
CSS = """
#base-image img, #lora-image img, #compare-image img { width: 100%; height: 100%; object-fit: contain; }
#base-image img, #lora-image img, #compare-image img, #sweep img, #samples img,
#live-samples img { image-rendering: pixelated; }
"""
DEFAULT_PROMPT = "a photo of sks cat"


@contextlib.contextmanager
def shown_in_ui() -> Iterator[None]:
    """Turn a user error (AppError, LoraFileError, diffusers' input checks) into a UI message."""
    try:
        yield
    except ValueError as error:
        raise gr.Error(str(error), print_exception=False) from None


def _settings(negative_prompt, steps, guidance, width, height) -> Settings:
    # Gradio's sliders and number boxes send floats; Settings checks the ranges.
    return Settings(negative_prompt or "", int(steps), float(guidance), int(width), int(height))


class Handlers:
    """Gradio event functions bound to one Studio; parameter names are the API's names."""

    def __init__(self, studio: Studio):
        self.studio = studio

    def generate(self, run: str, prompt: str, negative_prompt: str, seed: float, steps: float, guidance: float,
                 width: float, height: float, lora_scale: float, compare_run: str | None,
                 progress=gr.Progress()):
        """Base | LoRA (| second LoRA) with the same seed. Returns (base, lora, second, status)."""
        with shown_in_ui():
            settings = _settings(negative_prompt, steps, guidance, width, height)
            base, lora, third = callbacks.generate_images(self.studio, run, prompt, seed, lora_scale, settings,
                                                          compare_run or None, progress)
        status = f"seed {int(seed)}, LoRA scale {float(lora_scale):g}, {settings.steps} steps"
        # The third image is hidden by toggle_compare when no second LoRA is chosen; a plain
        # value here keeps the API's answer free of UI updates.
        return base, lora, third, status

    def sweep(self, run: str, prompt: str, negative_prompt: str, seed: float, steps: float, guidance: float,
              width: float, height: float, scales: str, progress=gr.Progress()):
        """One image per LoRA scale, same seed."""
        with shown_in_ui():
            settings = _settings(negative_prompt, steps, guidance, width, height)
            return callbacks.scale_sweep(self.studio, run, prompt, seed, scales, settings, progress)

    def browse(self, run: str | None):
        """Samples, curves, config, metadata and downloads of the selected run."""
        view = callbacks.browse(self.studio, run)
        buttons = [gr.DownloadButton(f"Download {p.name}", value=str(p), visible=True) for p in view.downloads]
        buttons += [gr.DownloadButton(visible=False)] * (2 - len(buttons))
        samples = [(str(path), caption) for path, caption in view.samples]
        return (samples, view.figure, view.config, view.metadata, *buttons[:2], view.message)

    def refresh(self, run: str | None, compare_run: str | None):
        """Find runs again, keeping the current choices where they still exist."""
        labels = list(self.studio.sources())
        run = run if run in labels else (labels[0] if labels else None)
        compare_run = compare_run if compare_run in labels else None
        return gr.Dropdown(choices=labels, value=run), gr.Dropdown(choices=[""] + labels, value=compare_run or "")

    def default_prompt(self, run: str | None, prompt: str):
        """The selected run's validation (or instance) prompt; the current prompt if it has none."""
        source = self.studio.sources().get(run or "")
        return (suggested_prompt(source) if source is not None else None) or prompt

    def randomise(self) -> int:
        """A new random seed."""
        return callbacks.random_seed()

    def toggle_compare(self, compare_run: str | None):
        """Show the third image only when a second LoRA is chosen."""
        return gr.Image(visible=bool(compare_run))


def build_ui(studio: Studio) -> gr.Blocks:
    """The app's Blocks; loads the base model (once) to learn its native resolution."""
    handlers = Handlers(studio)
    labels = list(studio.sources())
    size = studio.default_size()
    with gr.Blocks(title="Flat-LoRA preview", analytics_enabled=False) as demo:
        gr.Markdown(f"## Flat-LoRA preview\nBase model `{studio.base}` on {studio.device}. "
                    "Pick a training run (or a LoRA file); base and LoRA use the same seed.")
        with gr.Row():
            run = gr.Dropdown(labels, value=labels[0] if labels else None, label="Run or LoRA file", scale=6,
                              elem_id="run-picker")
            refresh = gr.Button("Refresh runs", scale=1, size="sm")
        with gr.Tab("Generate"):
            first_prompt = handlers.default_prompt(labels[0] if labels else None, DEFAULT_PROMPT)
            controls, outputs = _generate_tab(size, labels, first_prompt)
        with gr.Tab("Run browser"):
            browser = _browser_tab()
        with gr.Tab("Train"):
            build_train_tab(studio, Launcher(studio.runs_dir), run, size)
        prompt, negative, seed, randomise, steps, guidance, width, height, scale, compare, go = controls
        base_image, lora_image, compare_image, status, scales, sweep_button, sweep_gallery = outputs
        common = [prompt, negative, seed, steps, guidance, width, height]
        pair_in, pair_out = [run, *common, scale, compare], [base_image, lora_image, compare_image, status]
        go.click(handlers.generate, pair_in, pair_out, api_name="generate")
        prompt.submit(handlers.generate, pair_in, pair_out, api_visibility="private")
        sweep_button.click(handlers.sweep, [run, *common, scales], sweep_gallery, api_name="scale_sweep")
        randomise.click(handlers.randomise, None, seed, api_visibility="private")
        compare.change(handlers.toggle_compare, compare, compare_image, api_visibility="private")
        refresh.click(handlers.refresh, [run, compare], [run, compare], api_visibility="private")
        run.change(handlers.browse, run, browser, api_visibility="private")
        run.change(handlers.default_prompt, [run, prompt], prompt, api_visibility="private")
        demo.load(handlers.browse, run, browser, api_visibility="private")
    return demo


def _generate_tab(size: int, labels: list[str], first_prompt: str = DEFAULT_PROMPT):
    """Controls and outputs of the Generate tab."""
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            prompt = gr.Textbox(first_prompt, label="Prompt", lines=2, elem_id="prompt")
            negative = gr.Textbox("", label="Negative prompt", lines=1)
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=callbacks.MAX_SEED)
            randomise = gr.Button("Randomise seed", size="sm", elem_id="randomise")
            scale = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="LoRA scale")
            with gr.Accordion("Sampling", open=False):
                steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                guidance = gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="Guidance")
                width = gr.Slider(64, 2048, value=size, step=8, label="Width")
                height = gr.Slider(64, 2048, value=size, step=8, label="Height")
            compare = gr.Dropdown([""] + labels, value="", label="Compare with a second LoRA (optional)")
            go = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=5):
            with gr.Row():
                base_image = _image("Base", "base-image")
                lora_image = _image("LoRA", "lora-image")
                compare_image = _image("Second LoRA", "compare-image", visible=False)
            status = gr.Markdown("", elem_id="status")
            with gr.Accordion("Scale sweep", open=False):
                with gr.Row():
                    scales = gr.Textbox(SWEEP_DEFAULT, label="LoRA scales", scale=4)
                    sweep_button = gr.Button("Sweep", scale=1, size="sm")
                sweep_gallery = gr.Gallery(label="Same seed, one image per scale", columns=4, format="png",
                                           object_fit="contain", height=300, elem_id="sweep")
    controls = (prompt, negative, seed, randomise, steps, guidance, width, height, scale, compare, go)
    return controls, (base_image, lora_image, compare_image, status, scales, sweep_button, sweep_gallery)


def _image(label: str, elem_id: str, visible: bool = True) -> gr.Image:
    # PNG, not Gradio's default WebP, so what the browser and API client get is the exact image.
    return gr.Image(label=label, type="pil", format="png", interactive=False, elem_id=elem_id,
                    visible=visible, height=320, buttons=["download"])


def _browser_tab():
    """Outputs of the Run browser tab, in the order Handlers.browse returns them."""
    samples = gr.Gallery(label="Validation samples by step (top row base, bottom row LoRA)", columns=2,
                         height=360, format="png", object_fit="contain", elem_id="samples")
    curves = gr.Plot(label="Loss and sigma_t (metrics.jsonl)")
    with gr.Row():
        config = gr.JSON(label="config.json")
        metadata = gr.JSON(label="LoRA file metadata")
    with gr.Row():
        download_1 = gr.DownloadButton("Download", visible=False)
        download_2 = gr.DownloadButton("Download", visible=False)
    message = gr.Markdown("", elem_id="browser-message")
    return [samples, curves, config, metadata, download_1, download_2, message]
