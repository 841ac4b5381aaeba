"""The browser demo: `python -m grounded_llava.demo [--model DIR] [--port N]` (or `grounded-llava demo`).

`session.py` holds what a turn does (read an upload, answer, draw, save), `app.py` the gradio page,
`command.py` the command line. gradio is an optional extra: `pip install -e ".[demo]"`.
"""
