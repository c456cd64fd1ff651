"""The daemon's jobs once it runs: per-probe state, the publish cycle, operator
commands, live reload, systemd progress, and the read model the web and replay see."""
