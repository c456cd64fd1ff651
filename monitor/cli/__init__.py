"""The `crystal-monitor` command line: `main` parses, each module holds a command."""
