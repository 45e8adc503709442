"""Gradio preview app for Flat-LoRA runs: `python -m app` (see app/__main__.py).

Importing the package loads nothing heavy and launches nothing; the parts are
`app.callbacks.Studio` (state and generation), `app.ui.build_ui` (the page) and
`app.__main__.serve` (the launch).
"""
