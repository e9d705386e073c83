"""Adapters as files: Orbax checkpoints (``checkpoint``) and Hugging Face PEFT files (``peft``)."""
