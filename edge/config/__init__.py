"""The plant's YAML configuration: its models, how it is read, and what is said about it."""
