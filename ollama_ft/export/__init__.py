"""The export stage: HF -> GGUF with llama.cpp's converter, quantized and verified (runs/<run>/gguf/)."""
