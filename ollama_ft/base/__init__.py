"""The pull stage: resolve a base model spec into an HF directory (runs/<run>/base/)."""
