"""Ollama: model names, store, Modelfile, chat templates, HTTP API (register) and registry (publish)."""
