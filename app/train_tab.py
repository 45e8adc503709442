"""The Train tab: a form that starts a run, and a live view of any run with Stop and Resume.

API endpoints (gradio_client): `start_training` (the form; returns a message and the run's
name), `training_progress` (a run's state, step / total, seconds per step, time left, the
trainer's error line), `stop_training` and `resume_training`.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from . import live
from .callbacks import Studio, metrics_figure
from .launcher import Launcher, latest_log, log_lines
from .runs import AppError, read_metrics
from .train_form import FORM_FIELDS, TrainForm, create_run
from .uploads import image_folders

TICK_SECONDS = 2.0
LOG_LINES = 15
LIVE_OUTPUTS = 7  # what live_view returns
TEXT_FIELDS = ("run_name", "image_folder", "instance_prompt", "class_prompt", "validation_prompt")


class TrainHandlers:
    """Event functions of the Train tab; parameter names are the API's names."""

    def __init__(self, studio: Studio, launcher: Launcher):
        self.studio, self.launcher = studio, launcher

    def _folder(self, run: str | None) -> Path:
        """The run folder named `run` (a name from the list, never a path)."""
        folders = {p.name: p for p in live.run_folders(self.studio.runs_dir)}
        if not run or run not in folders:
            raise AppError(f"choose a training run first ({run!r} is not in the runs folder)")
        return folders[run]

    def start_training(self, images, run_name, image_folder, instance_prompt, class_prompt, prior_preservation,
                       num_class_images, max_train_steps, rank, lora_alpha, learning_rate, train_text_encoder,
                       text_encoder_lr, flat_sigma, flat_schedule, resolution, aspect_buckets, seed,
                       validation_prompt, validation_steps, checkpointing_steps, num_validation_images,
                       validation_inference_steps, mixed_precision):
        """Write the run folder and start the trainer; returns (message, run name)."""
        values = {name: value for name, value in locals().items() if name in FORM_FIELDS}
        try:
            if self.studio.runs_dir is None:
                raise AppError("the app has no runs folder (start it with --runs DIR)")
            self.launcher.check_idle()  # before writing anything
            texts = {name: values[name] or "" for name in TEXT_FIELDS}  # an API client may send None
            form = TrainForm(**{**values, **texts})
            folder = create_run(Path(self.studio.runs_dir), form, list(images or []), self.studio.base)
            pid = self.launcher.start(folder)
        except ValueError as error:
            discard_uploads(images)
            raise gr.Error(str(error), print_exception=False) from None
        # plain values: the API's answer stays free of UI updates (pick_run shows the run)
        return f"started **{folder.name}** (pid {pid}); its log is {folder.name}/train.log", folder.name

    def stop_training(self, run: str | None) -> str:
        """SIGTERM to the run's trainer: it saves a checkpoint after the current step and exits."""
        try:
            pid = self.launcher.stop(self._folder(run))
        except (ValueError, OSError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        return f"sent SIGTERM to pid {pid}: {run} checkpoints and stops after this step"

    def resume_training(self, run: str | None) -> str:
        """Restart the run with --resume_from_checkpoint latest."""
        try:
            pid = self.launcher.start(self._folder(run), resume=True)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from None
        return f"resumed **{run}** from its latest checkpoint (pid {pid})"

    def training_progress(self, run: str) -> dict:
        """The run's state: run, state, step, total, seconds_per_step, seconds_left, error, pid, ..."""
        try:
            return live.read_progress(self._folder(run), self.launcher).as_dict()
        except AppError as error:
            raise gr.Error(str(error), print_exception=False) from None

    def live_view(self, run: str | None, shown: tuple | None = None):
        """(summary, curves, newest samples, log tail, Stop, Resume, signature) of `run`.

        None when the run's signature equals `shown` (nothing to redraw; the timer passes `shown`).
        """
        try:
            folder = self._folder(run)
        except AppError as error:
            return (str(error), None, [], "", gr.Button(interactive=False), gr.Button(interactive=False), None)
        progress = live.read_progress(folder, self.launcher)
        signature = _signature(progress, folder)
        if signature == shown:
            return None
        samples = [(str(path), caption) for path, caption in live.newest_samples(folder)]
        tail = "\n".join(log_lines(latest_log(folder))[-LOG_LINES:])
        training = progress.pid is not None
        return (progress.summary(), metrics_figure(read_metrics(folder)[0]), samples, tail,
                gr.Button(interactive=training), gr.Button(interactive=progress.resumable and not training),
                signature)

    def tick(self, run: str | None, shown, picked: str | None):
        """The timer: redraw only when the run changed; offer a run that just finished for Generate."""
        view = None if run is None and shown is None else self.live_view(run, shown)
        if view is None or (view[-1] is None and shown is None):  # nothing (new) to show
            return (gr.skip(),) * (LIVE_OUTPUTS + 1)
        finished = view[-1] is not None and view[-1][0] == "finished" and (shown is None or shown[0] != "finished")
        return (*view, self.refreshed_picker(picked) if finished else gr.skip())

    def refreshed_picker(self, picked: str | None):
        """The main run picker with the runs found now (a finished run appears), the choice kept."""
        labels = list(self.studio.sources())
        return gr.Dropdown(choices=labels, value=picked if picked in labels else (labels[0] if labels else None))

    def pick_run(self, run: str):
        """The live view's run list found afresh, showing `run` (the one just started)."""
        return gr.Dropdown(choices=[p.name for p in live.run_folders(self.studio.runs_dir)], value=run)

    def run_choices(self, run: str | None):
        """The live view's run list found afresh, and the image folders of the form."""
        names = [p.name for p in live.run_folders(self.studio.runs_dir)]
        root = Path(self.studio.runs_dir) if self.studio.runs_dir is not None else None
        value = run if run in names else (names[0] if names else None)
        return gr.Dropdown(choices=names, value=value), gr.Dropdown(choices=[""] + image_folders(root))


def discard_uploads(files) -> None:
    """Delete refused uploads from Gradio's upload cache: uploads are kept under the runs root only."""
    cache = Path(get_upload_folder()).resolve()
    for file in files or []:
        path = Path(file).resolve()
        if path.is_relative_to(cache) and path.is_file():
            path.unlink()


def _signature(progress: live.Progress, folder: Path) -> tuple:
    """What must change for the live view to be redrawn."""
    return (progress.state, progress.step, progress.pid, len(live.newest_samples(folder, 1000)),
            progress.last_log_line)


def build_train_tab(studio: Studio, launcher: Launcher, run_picker: gr.Dropdown, default_size: int) -> None:
    """The Train tab's components and events (call inside `gr.Tab`)."""
    handlers = TrainHandlers(studio, launcher)
    runs = [p.name for p in live.run_folders(studio.runs_dir)]
    root = Path(studio.runs_dir) if studio.runs_dir is not None else None
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            images, form, start, start_message = _form(TrainForm(resolution=default_size), image_folders(root))
        with gr.Column(scale=3):
            with gr.Row():
                live_run = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run", scale=5,
                                       elem_id="live-run")
                refresh = gr.Button("Refresh", size="sm", scale=1)
            summary = gr.Markdown("", elem_id="live-summary")
            with gr.Row():
                stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="train-stop")
                resume = gr.Button("Resume", interactive=False, elem_id="train-resume")
            action_message = gr.Markdown("", elem_id="train-action")
            curves = gr.Plot(label="Loss and sigma_t (metrics.jsonl)", elem_id="live-curves")
            samples = gr.Gallery(label="Newest samples", columns=4, height=200, format="png",
                                 object_fit="contain", elem_id="live-samples")
            log = gr.Textbox(label="train.log (latest start)", lines=6, max_lines=LOG_LINES, interactive=False,
                             elem_id="live-log")
    shown = gr.State(None)
    view = [summary, curves, samples, log, stop, resume, shown]
    inputs = [images, *(form[name] for name in FORM_FIELDS)]
    started = gr.Textbox(visible=False)  # the started run's name: the API's second answer
    start.click(handlers.start_training, inputs, [start_message, started], api_name="start_training").success(
        handlers.pick_run, started, live_run, api_visibility="private")
    stop.click(handlers.stop_training, live_run, action_message, api_name="stop_training")
    resume.click(handlers.resume_training, live_run, action_message, api_name="resume_training")
    live_run.change(handlers.live_view, live_run, view, api_visibility="private")
    refresh.click(handlers.run_choices, live_run, [live_run, form["image_folder"]], api_visibility="private")
    timer = gr.Timer(TICK_SECONDS)
    timer.tick(handlers.tick, [live_run, shown, run_picker], [*view, run_picker], api_visibility="private",
               show_progress="hidden")
    gr.api(handlers.training_progress, api_name="training_progress")


def _form(defaults: TrainForm, folders: list[str]):
    """The form's components: (upload box, {field: component}, Start button, message)."""
    form = {}
    form["run_name"] = gr.Textbox("", label="Run name (a new folder in the runs folder; empty: run-<time>)",
                                  elem_id="train-run-name")
    images = gr.File(label="Instance images (upload)", file_count="multiple", file_types=["image"],
                     elem_id="train-images")
    form["image_folder"] = gr.Dropdown([""] + folders, value="", elem_id="train-image-folder",
                                       label="... or a folder of images under the runs folder")
    form["instance_prompt"] = gr.Textbox("", label="Instance prompt", placeholder="a photo of sks dog",
                                         elem_id="train-instance-prompt")
    with gr.Accordion("Class images and prior preservation", open=False):
        form["class_prompt"] = gr.Textbox("", label="Class prompt (e.g. a photo of a dog)")
        form["prior_preservation"] = gr.Checkbox(False, label="Prior preservation")
        form["num_class_images"] = gr.Number(defaults.num_class_images, label="Class images", precision=0)
    with gr.Accordion("Training", open=True):
        with gr.Row():
            form["max_train_steps"] = gr.Number(defaults.max_train_steps, label="Steps", elem_id="train-steps")
            form["rank"] = gr.Number(defaults.rank, label="Rank")
            form["lora_alpha"] = gr.Number(defaults.lora_alpha, label="Alpha")
        with gr.Row():
            form["learning_rate"] = gr.Number(defaults.learning_rate, label="Learning rate", step=1e-5)
            form["train_text_encoder"] = gr.Checkbox(defaults.train_text_encoder, label="Train text encoders")
            form["text_encoder_lr"] = gr.Number(defaults.text_encoder_lr, label="Text-encoder LR (0: same)",
                                                step=1e-5)
        with gr.Row():
            form["flat_sigma"] = gr.Number(defaults.flat_sigma, label="Flat-LoRA sigma (0: plain LoRA)", step=0.01)
            form["flat_schedule"] = gr.Dropdown(["cosine", "constant"], value=defaults.flat_schedule,
                                                label="Sigma schedule")
        with gr.Row():
            form["resolution"] = gr.Number(defaults.resolution, label="Resolution", elem_id="train-resolution")
            form["aspect_buckets"] = gr.Checkbox(defaults.aspect_buckets, label="Aspect buckets")
            form["seed"] = gr.Number(defaults.seed, label="Seed", precision=0)
    with gr.Accordion("Samples, checkpoints, precision", open=False):
        form["validation_prompt"] = gr.Textbox("", label="Sample prompts, one per line (empty: the instance prompt)",
                                               lines=2)
        with gr.Row():
            form["validation_steps"] = gr.Number(defaults.validation_steps,
                                                 label="Samples every N steps (0: at the end only)")
            form["checkpointing_steps"] = gr.Number(defaults.checkpointing_steps, label="Checkpoint every N steps")
        with gr.Row():
            form["num_validation_images"] = gr.Number(defaults.num_validation_images, label="Images per prompt")
            form["validation_inference_steps"] = gr.Number(defaults.validation_inference_steps,
                                                           label="Sampling steps", elem_id="train-sample-steps")
            form["mixed_precision"] = gr.Dropdown(["no", "fp16", "bf16"], value=defaults.mixed_precision,
                                                  label="Precision of the frozen base")
    start = gr.Button("Start training", variant="primary", elem_id="train-start")
    message = gr.Markdown("", elem_id="train-message")
    return images, form, start, message
