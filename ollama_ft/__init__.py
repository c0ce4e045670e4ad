"""ollama-ft: fine-tune a base model on your own data and run it in your local Ollama."""

__version__ = "0.1.0"
