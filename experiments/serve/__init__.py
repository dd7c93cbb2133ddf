"""Models as a service: `plutao serve RUN [RUN ...]` answers OpenAI's completions and chat completions
API (so the official `openai` client, curl, chat UIs and evaluation harnesses reach a plutao model), ours
for rewards and tokenization, Prometheus metrics, and a web chat that compares the stages side by side.

The engine under it (the scheduler thread: continuous batching over the decoding slots) is
model/engine.py, beside the sampler it drives.

served.py  the runs served (loaded once) and their scoring passes
schemas.py request bodies and OpenAI's error shape
api.py     the FastAPI routes
metrics.py the Prometheus metrics
page.html  the web chat (no build step, no CDN)
"""
