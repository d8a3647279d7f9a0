"""Integrations with training frameworks. Each is imported on its own, so `import gradsift` stays light."""
