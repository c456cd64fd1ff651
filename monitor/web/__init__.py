"""The HTTP side of the daemon: /healthz, /readyz, /metrics, a JSON API and the dashboard.

`config` is imported by `monitor.config.settings` and stays light; `server` (aiohttp) is imported
only when `[http] enabled = true`.
"""
