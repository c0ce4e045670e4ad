"""The eval stage: base vs tuned model metrics, report and regression gate (runs/<run>/report/)."""
