"""`scalelab serve`: an OpenAI-compatible server and a web app for people in the loop.

engine.py  batches concurrent requests into one decode loop per model, streaming tokens
api.py     /v1/models, /v1/chat/completions, /v1/completions (OpenAI's shapes and errors)
web.py     the web app's endpoints: preference labelling, tracker
app.py     the FastAPI app, API-key / Host / body-size guard, `serve()`
static/    the page (plain HTML, CSS and JS; no build step)
"""
