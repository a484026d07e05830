"""Integrations with other libraries. ``doe_ext.integrations.hf``: the Hugging Face drop-in (``doeify``)."""
