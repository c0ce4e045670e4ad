"""The data stage: read, validate, split and tokenize the training data (runs/<run>/data/)."""
