"""The train stage: QLoRA training of a PEFT adapter (runs/<run>/adapter/), and its resource plan."""
