"""Configuration: the settings file's pydantic models, one module per section, and the
steps that check what validation alone cannot (files, secrets, the network).

`settings` holds the top-level `Settings` and `load_settings`; `template` renders the
commented default file (`print-default-config`) from the same models.
"""
